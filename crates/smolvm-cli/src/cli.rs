//! The command-line grammar. `smolvm --help` is written to teach the whole tool.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "smolvm",
    version,
    about = "Disposable, hardware-isolated Linux sandboxes (microVMs) for AI agents",
    long_about = "smolvm boots small Linux virtual machines from images this project builds itself \
(a Debian kernel and a Debian trixie base rootfs), every byte pinned by SHA-256 in the binary.",
    after_help = "\
IMAGES (for maintainers and air-gapped hosts):
  smolvm image build all --out dist      build kernel + base rootfs, write dist/<tag>/ (a release)
  smolvm image build kernel --out DIR    only the guest kernel (vmlinux ELF + bzImage)
  smolvm image build base --out DIR      only the base rootfs (ext4, smolvm-init at /init)
  smolvm image pin dist/<tag>            pin that release in images/release.toml (then rebuild)
  smolvm image show                      the pins compiled into this binary

Builds are cached by recipe hash under /var/cache/smolvm/build (SMOLVM_BUILD_CACHE).
Logs: -v / -vv, or SMOLVM_LOG=debug. Every command takes --json for machine-readable output."
)]
pub struct Cli {
    /// More log output on stderr (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Print the result as JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build, pin and inspect the kernel and rootfs images.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build images from Debian's packages (needs root and the Debian mirror).
    #[command(subcommand)]
    Build(BuildCommand),
    /// Check a built release and write its pins to images/release.toml.
    Pin {
        /// The release directory, DIR/<tag> as written by `image build all`.
        release_dir: PathBuf,
        /// The pins file to rewrite (default: the checkout's images/release.toml).
        #[arg(long)]
        release_toml: Option<PathBuf>,
    },
    /// Show the release pinned in this binary: tag, URLs, sizes, SHA-256.
    Show,
}

#[derive(Debug, Subcommand)]
pub enum BuildCommand {
    /// The guest kernel: DIR/vmlinux-x86_64.elf (PVH) and DIR/vmlinux-x86_64.image (bzImage).
    Kernel {
        #[command(flatten)]
        common: BuildArgs,
    },
    /// The base rootfs: DIR/base-x86_64-rootfs.ext4.
    Base {
        #[command(flatten)]
        common: BuildArgs,
        /// Use this smolvm-init binary instead of building it (must be static).
        #[arg(long)]
        init: Option<PathBuf>,
        /// SOURCE_DATE_EPOCH for the image (default: the environment's, else the pinned tag's date).
        #[arg(long)]
        epoch: Option<i64>,
    },
    /// Every asset of a release, with manifest.json and SHA256SUMS, in DIR/<tag>/.
    All {
        #[command(flatten)]
        common: BuildArgs,
        /// Release tag, images-YYYY.MM.DD.N (default: the tag pinned in this binary).
        #[arg(long)]
        tag: Option<String>,
        /// Replace DIR/<tag> if it exists.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// The smolvm source checkout (default: found from the current directory).
    #[arg(long)]
    pub source: Option<PathBuf>,
    /// Build cache directory (default: /var/cache/smolvm/build as root).
    #[arg(long, env = "SMOLVM_BUILD_CACHE")]
    pub cache: Option<PathBuf>,
}
