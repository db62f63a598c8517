//! Network bring-up: hostname, loopback, and one static interface from the kernel's `ip=`.
//!
//! Configuration goes through rtnetlink ([`netlink`]) rather than by running `ip`: one process
//! start under an emulated CPU costs more than the whole netlink exchange, and the base image
//! need not carry iproute2 for the init's sake.

mod ipconfig;
mod netlink;

use std::net::Ipv4Addr;

use smolvm_protocol::cmdline;

use crate::log;
pub use ipconfig::IpConfig;

/// Brings up `lo`, then the interface described by `ip=` (if any); sets hostname and resolver.
pub fn configure(cmdline_text: &str) {
    let ip = match cmdline::get(cmdline_text, cmdline::IP).map(IpConfig::parse) {
        None => None,
        Some(Ok(cfg)) => cfg,
        Some(Err(e)) => {
            log::error!("ignoring malformed ip= argument: {e}");
            None
        }
    };
    let hostname = cmdline::get(cmdline_text, cmdline::HOSTNAME)
        .filter(|h| valid_hostname(h))
        .or_else(|| ip.as_ref().and_then(|c| c.hostname.as_deref()))
        .unwrap_or("smolvm")
        .to_string();
    if let Some(h) = cmdline::get(cmdline_text, cmdline::HOSTNAME).filter(|h| !valid_hostname(h)) {
        log::error!("ignoring invalid hostname {h:?} (letters, digits, '-' and '.', at most 63 bytes)");
    }
    set_hostname(&hostname);

    let mut nl = match netlink::Route::open() {
        Ok(nl) => nl,
        Err(e) => {
            log::error!("cannot open rtnetlink socket: {e}; network left down");
            return;
        }
    };
    if let Err(e) = nl.link_up("lo") {
        log::error!("bring up lo: {e}");
    }
    let Some(cfg) = ip else { return };
    if let Err(e) = apply(&mut nl, &cfg) {
        log::error!("configure {}: {e}", cfg.device);
        return;
    }
    write_resolv_conf(&cfg.dns);
}

fn apply(nl: &mut netlink::Route, cfg: &IpConfig) -> std::io::Result<()> {
    nl.link_up(&cfg.device)?;
    nl.add_ipv4_address(&cfg.device, cfg.address, cfg.prefix_len)?;
    if let Some(gw) = cfg.gateway {
        nl.add_ipv4_default_route(&cfg.device, gw)?;
    }
    Ok(())
}

pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 63
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !h.starts_with('-')
}

pub fn set_hostname(name: &str) {
    // SAFETY: the pointer and length describe `name`'s bytes, which outlive the call.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        log::error!("sethostname {name}: {}", std::io::Error::last_os_error());
    }
    let hosts = format!("127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if let Err(e) =
        std::fs::write("/etc/hosts", hosts).and_then(|_| std::fs::write("/etc/hostname", format!("{name}\n")))
    {
        log::error!("write /etc/hosts: {e}");
    }
}

fn write_resolv_conf(dns: &[Ipv4Addr]) {
    if dns.is_empty() {
        return;
    }
    let body: String = dns.iter().map(|d| format!("nameserver {d}\n")).collect();
    // /etc/resolv.conf may be a dangling symlink left by a resolver package; replace it.
    let _ = std::fs::remove_file("/etc/resolv.conf");
    if let Err(e) = std::fs::write("/etc/resolv.conf", body) {
        log::error!("write /etc/resolv.conf: {e}");
    }
}
