//! Building the base rootfs twice from the same package set gives the same SHA-256.
//!
//! The first build is the cached one (`smolvm image build` made it); the second runs the recipe
//! again into a temporary directory, a full mmdebstrap and mkfs. Needs root and the Debian
//! mirror: `#[ignore]`d for a plain `cargo test`; `scripts/test.sh` runs it.

#![allow(clippy::unwrap_used)]

use smolvm::digest::sha256_file;
use smolvm_release::{build_base, build_base_into, build_init, BuildEnv};

#[test]
#[ignore = "runs mmdebstrap (root, Debian mirror): run scripts/test.sh"]
fn base_rootfs_is_bit_for_bit_reproducible() {
    let env = BuildEnv::discover(None, None).unwrap();
    let init = build_init(&env).unwrap();
    // A fixed epoch: reproducibility must not depend on which tag is pinned.
    let epoch = 1_796_083_200;
    let (cached, _) = build_base(&env, &init, epoch).unwrap();
    let again = tempfile::tempdir_in(&env.cache).unwrap();
    let rebuilt = build_base_into(&env, &init, epoch, again.path()).unwrap();

    let packages =
        |dir: &std::path::Path| std::fs::read_to_string(dir.join("base-x86_64-rootfs.ext4.packages")).unwrap();
    assert_eq!(
        packages(&cached.dir),
        packages(again.path()),
        "the Debian archive changed between the two builds; run the test again"
    );
    let (size_a, sha_a) = sha256_file(&cached.ext4()).unwrap();
    let (size_b, sha_b) = sha256_file(&rebuilt).unwrap();
    assert_eq!((size_a, &sha_a), (size_b, &sha_b), "two builds of the same package set differ");
}
