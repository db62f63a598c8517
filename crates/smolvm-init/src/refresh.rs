//! After a restore from a snapshot: the guest is a copy of another, frozen moment ago.
//!
//! Its kernel's random state is that of the snapshot (two clones would draw the same bytes
//! from `/dev/urandom` until something reseeded them: nothing does on its own, and microvm has
//! no vmgenid device for the kernel to notice), its clock is behind by the time since the save,
//! and a clone still carries its source's hostname, machine-id and SSH host key. The host's
//! [`Refresh`] fixes all of that before it runs any command: host randomness mixed into the
//! pool and a forced reseed (every CPU's generator and the vDSO's follow the base generation),
//! the clock stepped, and for a clone a new identity. The machine-id and host key are drawn
//! after the reseed.
//!
//! `/proc/sys/kernel/random/boot_id` cannot be changed: the kernel draws it at its first read.
//! A boot snapshot is taken before anything reads it, so each guest restored from one draws
//! its own; a snapshot of a guest that had read it keeps it.

use smolvm_protocol::agent::{Refresh, Refreshed};

use crate::log;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Does what `r` asks; each step that fails is reported, the others are still done.
pub fn apply(r: &Refresh) -> Refreshed {
    let mut out = Refreshed::default();
    let mut errors = Vec::new();
    let mut fail = |what: &str, e: std::io::Error| {
        log::error!("refresh: {what}: {e}");
        errors.push(format!("{what}: {e}"));
    };
    let mut steps = Vec::new();
    let mut at = std::time::Instant::now();
    let mut step = |name: &str| {
        steps.push((name.to_string(), at.elapsed().as_micros() as u64));
        at = std::time::Instant::now();
    };
    match decode_hex(&r.seed_hex) {
        Some(seed) if seed.len() >= 32 => {
            if let Err(e) = reseed(&seed) {
                fail("reseed the kernel's random state", e);
            }
        }
        _ => fail("reseed", std::io::Error::other("the seed is not at least 32 bytes of hex")),
    }
    step("reseed");
    if let Err(e) = set_clock(r.unix_ns) {
        fail("step the clock", e);
    }
    step("clock");
    if let Some(id) = &r.identity {
        if crate::net::valid_hostname(&id.hostname) {
            crate::net::set_hostname(&id.hostname);
        } else {
            fail("hostname", std::io::Error::other(format!("{:?} is not a valid hostname", id.hostname)));
        }
        step("hostname");
        if let Err(e) = write_machine_id() {
            fail("write /etc/machine-id", e);
        }
        step("machine_id");
        match crate::ssh::rekey(&id.authorized_key_b64, id.host_key.as_ref()) {
            Ok(k) => out.host_key = Some(k),
            Err(e) => fail("new SSH host key", e),
        }
        step("ssh");
    }
    out.errors = errors;
    out.steps_us = steps;
    out
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Mixes `seed` into the input pool (credited as entropy) and forces the generator to reseed
/// from it, so the next bytes anyone reads depend on it.
fn reseed(seed: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u8> = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    // The buffer must be 4-byte aligned for the kernel's struct: copy into u32 words.
    let mut words = vec![0u32; info.len().div_ceil(4)];
    for (i, chunk) in info.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        words[i] = u32::from_ne_bytes(w);
    }
    // SAFETY: `words` holds a complete rand_pool_info (header and `buf_size` bytes) and lives
    // across the call; the kernel only reads it.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, words.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: an ioctl without argument on a descriptor we own.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_clock(unix_ns: u64) -> std::io::Result<()> {
    let ts =
        libc::timespec { tv_sec: (unix_ns / 1_000_000_000) as libc::time_t, tv_nsec: (unix_ns % 1_000_000_000) as _ };
    // SAFETY: a valid timespec, read by the call only.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A new `/etc/machine-id` (32 hex digits), from the reseeded generator.
pub fn write_machine_id() -> std::io::Result<()> {
    let mut b = [0u8; 16];
    // SAFETY: the buffer is ours and 16 bytes long.
    if unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) } != b.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let tmp = "/etc/.machine-id.tmp";
    std::fs::write(tmp, format!("{hex}\n"))?;
    std::fs::rename(tmp, "/etc/machine-id")
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_seeds_decode_and_bad_ones_do_not() {
        assert_eq!(super::decode_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(super::decode_hex("0"), None);
        assert_eq!(super::decode_hex("zz"), None);
    }

    #[test]
    fn the_ioctl_numbers_are_the_kernels() {
        // _IOW('R', 3, int[2]): dir write (1) << 30 | size 8 << 16 | 'R' << 8 | 3.
        assert_eq!(super::RNDADDENTROPY, (1 << 30) | (8 << 16) | ((b'R' as libc::c_ulong) << 8) | 3);
        assert_eq!(super::RNDRESEEDCRNG, ((b'R' as libc::c_ulong) << 8) | 7);
    }
}
