# smolvm: the base image keeps only the C.UTF-8 locale.
export LANG=C.UTF-8
