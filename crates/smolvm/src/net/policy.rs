//! The network policy of a sandbox and the decision for each connection.
//!
//! A policy is a value ([`NetworkPolicy`]) stored with the sandbox and handed to its network
//! process. [`Decider`] turns it into answers: for a new TCP connection or UDP flow to an address
//! ([`Decider::check_ip`]), for a name the guest resolves ([`Decider::check_resolved`]), and for
//! the name a TLS or HTTP client then names in its first bytes ([`Decider::check_name`]).
//!
//! What "internet only" refuses is written once, in [`special_range`]: the host (loopback, and
//! every address of its interfaces, checked by the caller through [`HostAddrs`]), private and
//! shared ranges, link-local (cloud metadata services), multicast and the reserved ranges.
//! Documentation ranges (TEST-NET-1..3) are not refused: they are never routed on the internet,
//! and the integration tests use them as their "internet".

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What a sandbox may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Internet only: public addresses, DNS through smolvm's resolver; never the host or
    /// private networks. Narrowed further by allow-lists.
    #[default]
    Nat,
    /// Nothing out. Forwards from the host (SSH, `expose`, the agent) still work.
    None,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Nat => "nat",
            NetworkMode::None => "none",
        }
    }
}

impl FromStr for NetworkMode {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        match s {
            "nat" => Ok(NetworkMode::Nat),
            "none" => Ok(NetworkMode::None),
            _ => Err(PolicyError::Mode(s.to_string())),
        }
    }
}

/// Why a policy value is invalid: one variant per field, the message next to it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("network mode {0:?} is not one of: nat, none")]
    Mode(String),
    #[error("{0:?} is not a domain name (letters, digits, '-', dots; `*.example.com` for subdomains)")]
    Domain(String),
    #[error("{0:?} is not a CIDR (e.g. 203.0.113.0/24, 2001:db8::/32, or a single address)")]
    Cidr(String),
    #[error("host port 0 is not a port")]
    HostPort,
    #[error("network mode none admits nothing: it cannot be combined with allowed domains or ranges")]
    NoneWithAllowList,
}

/// A domain name, or `*.name` for every subdomain of `name` (not `name` itself).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DomainPattern {
    /// Lowercase, no trailing dot.
    name: String,
    wildcard: bool,
}

impl DomainPattern {
    pub fn matches(&self, host: &str) -> bool {
        let host = normalize_name(host);
        if self.wildcard {
            host.len() > self.name.len() + 1
                && host.ends_with(&self.name)
                && host.as_bytes()[host.len() - self.name.len() - 1] == b'.'
        } else {
            host == self.name
        }
    }
}

/// Lowercase, without a trailing dot: how names are compared.
pub fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

impl FromStr for DomainPattern {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let n = normalize_name(s);
        let (wildcard, name) = match n.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, n),
        };
        if !valid_hostname(&name) || name.parse::<IpAddr>().is_ok() {
            return Err(PolicyError::Domain(s.to_string()));
        }
        Ok(DomainPattern { name, wildcard })
    }
}

impl TryFrom<String> for DomainPattern {
    type Error = PolicyError;
    fn try_from(s: String) -> Result<Self, PolicyError> {
        s.parse()
    }
}

impl From<DomainPattern> for String {
    fn from(d: DomainPattern) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

/// An address range, `addr/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let bad = || PolicyError::Cidr(s.to_string());
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr = canonical(a.parse::<IpAddr>().map_err(|_| bad())?);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl TryFrom<String> for Cidr {
    type Error = PolicyError;
    fn try_from(s: String) -> Result<Self, PolicyError> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A sandbox's network policy: the mode, and allow-lists that narrow it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkPolicy {
    pub mode: NetworkMode,
    /// With any allow-list set, egress is refused except to these names (checked on each
    /// connection: TLS SNI, HTTP Host, and the address the name resolved to) ...
    #[serde(default)]
    pub allow_domains: Vec<DomainPattern>,
    /// ... and to these ranges.
    #[serde(default)]
    pub allow_cidrs: Vec<Cidr>,
    /// Ports of the host's 127.0.0.1 that the guest may reach at [`super::GATEWAY`].
    #[serde(default)]
    pub allow_host_ports: Vec<u16>,
    /// Let `allow_cidrs` admit private ranges (RFC 1918, 100.64/10, fc00::/7, ...) where
    /// they cover them. Without it an allowed range never opens them (`0.0.0.0/0` means the
    /// internet); link-local (metadata services), loopback, multicast and reserved ranges are
    /// refused whatever the policy says.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_private: bool,
}

impl NetworkPolicy {
    /// `--network none`.
    pub fn none() -> NetworkPolicy {
        NetworkPolicy { mode: NetworkMode::None, ..NetworkPolicy::default() }
    }

    /// Checks the combination of fields; the fields themselves are valid by construction.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.allow_host_ports.contains(&0) {
            return Err(PolicyError::HostPort);
        }
        if self.mode == NetworkMode::None && (!self.allow_domains.is_empty() || !self.allow_cidrs.is_empty()) {
            return Err(PolicyError::NoneWithAllowList);
        }
        Ok(())
    }

    /// Whether egress is narrowed to allow-lists.
    pub fn has_allow_list(&self) -> bool {
        !self.allow_domains.is_empty() || !self.allow_cidrs.is_empty()
    }

    /// One line for people: `nat`, `nat, allow a.test *.b.test 203.0.113.0/24, host ports 8080`.
    pub fn summary(&self) -> String {
        let mut s = self.mode.as_str().to_string();
        if self.has_allow_list() {
            let items: Vec<String> = self
                .allow_domains
                .iter()
                .map(|d| d.to_string())
                .chain(self.allow_cidrs.iter().map(|c| c.to_string()))
                .collect();
            s.push_str(&format!(", only {}", items.join(" ")));
        } else if self.mode == NetworkMode::Nat {
            s.push_str(" (internet only)");
        }
        if !self.allow_host_ports.is_empty() {
            let ports: Vec<String> = self.allow_host_ports.iter().map(u16::to_string).collect();
            s.push_str(&format!(", host ports {}", ports.join(" ")));
        }
        if self.allow_private {
            s.push_str(", private ranges in those CIDRs");
        }
        s
    }
}

/// Whether a special range is one that no policy opens: the host itself, link-local (the
/// metadata services at 169.254.169.254 and fe80::), multicast, reserved.
fn never_allowed(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            o[0] == 127 || o[0] == 0 || (o[0] == 169 && o[1] == 254) || o[0] >= 224
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || s[0] & 0xffc0 == 0xfe80
                || s[0] & 0xff00 == 0xff00
                || (s[0] == 0x64 && s[1] == 0xff9b && {
                    let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
                    never_allowed(IpAddr::V4(v4))
                })
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The range an address is in, if "internet only" refuses it; `None` for a public address.
pub fn special_range(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    Some(match o {
        [127, ..] => "loopback (the host)",
        [0, ..] => "this network (0.0.0.0/8)",
        [10, ..] => "private (10.0.0.0/8)",
        [172, b, ..] if (16..32).contains(&b) => "private (172.16.0.0/12)",
        [192, 168, ..] => "private (192.168.0.0/16)",
        [100, b, ..] if (64..128).contains(&b) => "shared address space (100.64.0.0/10)",
        [169, 254, ..] => "link-local (169.254.0.0/16, metadata services)",
        [192, 0, 0, _] => "IETF protocol assignments (192.0.0.0/24)",
        [198, b, ..] if b == 18 || b == 19 => "benchmarking (198.18.0.0/15)",
        [a, ..] if (224..240).contains(&a) => "multicast (224.0.0.0/4)",
        [a, ..] if a >= 240 => "reserved (240.0.0.0/4, broadcast)",
        _ => return None,
    })
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    Some(if ip.is_loopback() {
        "loopback (the host)"
    } else if ip.is_unspecified() {
        "unspecified (::)"
    } else if s[0] & 0xfe00 == 0xfc00 {
        "unique local (fc00::/7)"
    } else if s[0] & 0xffc0 == 0xfe80 {
        "link-local (fe80::/10)"
    } else if s[0] & 0xff00 == 0xff00 {
        "multicast (ff00::/8)"
    } else if s[0] == 0x64 && s[1] == 0xff9b {
        // NAT64 embeds an IPv4 address: judge that one.
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return special_v4(v4).map(|_| "NAT64 of a refused IPv4 range (64:ff9b::/96)");
    } else if ip.to_ipv4().is_some() && s[0..6] == [0; 6] {
        "IPv4-compatible (::/96)"
    } else {
        return None;
    })
}

/// The host's own addresses (every interface), refreshed at most every few seconds: the guest
/// must not reach the host by any of them, whatever range they are in.
#[derive(Debug, Default)]
pub struct HostAddrs {
    addrs: Vec<IpAddr>,
    read_at: Option<Instant>,
    /// A list given by a test: never re-read.
    fixed: bool,
}

impl HostAddrs {
    const REFRESH: Duration = Duration::from_secs(5);

    /// A fixed list, for tests.
    pub fn fixed(addrs: Vec<IpAddr>) -> HostAddrs {
        HostAddrs { addrs, read_at: None, fixed: true }
    }

    pub fn contains(&mut self, ip: IpAddr) -> bool {
        if !self.fixed && self.read_at.is_none_or(|t| t.elapsed() > Self::REFRESH) {
            self.addrs = interface_addrs();
            self.read_at = Some(Instant::now());
        }
        self.addrs.contains(&canonical(ip))
    }
}

/// Every address of every interface of this host (network namespace).
fn interface_addrs() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we own and free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        tracing::warn!("getifaddrs: {}", std::io::Error::last_os_error());
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says which struct it is.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: AF_INET: the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
            } else if family == libc::AF_INET6 {
                // SAFETY: AF_INET6: the sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(canonical(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The answer for a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Connect to this address.
    Allow,
    /// Allowed only if the client then names an allowed host (TLS SNI or HTTP Host) that
    /// resolved to this address: wait for its first bytes.
    NeedName,
    /// Refused, with the rule that refused it.
    Refuse(String),
}

/// How long a name the guest resolved vouches for its addresses. Longer than the TTL we give
/// out (clients cache), short enough that a name's old addresses do not stay open for ever.
const RESOLVED_FOR: Duration = Duration::from_secs(30 * 60);

/// A policy, the host's addresses and what the guest resolved: decides each connection.
#[derive(Debug)]
pub struct Decider {
    pub policy: NetworkPolicy,
    pub host: HostAddrs,
    /// Address -> (name, until): the names smolvm's resolver answered with that address.
    resolved: HashMap<IpAddr, Vec<(String, Instant)>>,
}

impl Decider {
    pub fn new(policy: NetworkPolicy, host: HostAddrs) -> Decider {
        Decider { policy, host, resolved: HashMap::new() }
    }

    /// Whether `name` is on the domain allow-list (when there is an allow-list).
    pub fn name_allowed(&self, name: &str) -> bool {
        self.policy.allow_domains.iter().any(|d| d.matches(name))
    }

    fn in_allowed_cidr(&self, ip: IpAddr) -> bool {
        self.policy.allow_cidrs.iter().any(|c| c.contains(ip))
    }

    /// The verdict on an address in a special range (`None`: not in one): refused, unless it
    /// is a private range that an allowed CIDR covers under `allow_private`.
    fn special(&self, ip: IpAddr) -> Option<Verdict> {
        let range = special_range(ip)?;
        if !never_allowed(ip) && self.policy.allow_private && self.in_allowed_cidr(ip) {
            return Some(Verdict::Allow);
        }
        let why = if self.in_allowed_cidr(ip) && !never_allowed(ip) {
            format!("{range}: an allowed CIDR opens a private range only with --allow-private")
        } else {
            range.to_string()
        };
        Some(Verdict::Refuse(why))
    }

    /// The first check of a connection (TCP) or flow (UDP) to `ip` outside the gateway.
    pub fn check_ip(&mut self, ip: IpAddr, tcp: bool) -> Verdict {
        if self.policy.mode == NetworkMode::None {
            return Verdict::Refuse("network none".into());
        }
        if self.host.contains(ip) || canonical(ip).is_loopback() || canonical(ip).is_unspecified() {
            return Verdict::Refuse("the host's own address".into());
        }
        if let Some(v) = self.special(ip) {
            return v;
        }
        if self.in_allowed_cidr(ip) {
            return Verdict::Allow;
        }
        if !self.policy.has_allow_list() {
            return Verdict::Allow;
        }
        if self.policy.allow_domains.is_empty() {
            return Verdict::Refuse("not in --allow-cidr".into());
        }
        if !self.vouched(ip).any(|n| self.name_allowed(n)) {
            return Verdict::Refuse("no allowed name resolved to this address".into());
        }
        if tcp {
            Verdict::NeedName
        } else {
            Verdict::Refuse("UDP to an --allow-domain name (its host cannot be checked)".into())
        }
    }

    /// The second check of a `NeedName` connection: `name` is what the client sent (SNI or
    /// Host), `None` if it sent neither.
    pub fn check_name(&mut self, ip: IpAddr, name: Option<&str>) -> Verdict {
        let Some(name) = name else {
            return Verdict::Refuse("no TLS server name or HTTP Host to check against --allow-domain".into());
        };
        let name = normalize_name(name);
        if !self.name_allowed(&name) {
            return Verdict::Refuse(format!("{name} is not in --allow-domain"));
        }
        if !self.vouched(ip).any(|n| *n == name) {
            return Verdict::Refuse(format!("{name} did not resolve to this address"));
        }
        Verdict::Allow
    }

    fn vouched(&self, ip: IpAddr) -> impl Iterator<Item = &String> {
        let now = Instant::now();
        self.resolved.get(&canonical(ip)).into_iter().flatten().filter(move |(_, t)| *t > now).map(|(n, _)| n)
    }

    /// Whether the resolver may answer for `name` at all.
    pub fn check_query(&self, name: &str) -> Verdict {
        if self.policy.mode == NetworkMode::None {
            return Verdict::Refuse("network none".into());
        }
        // Under an allow-list the resolver answers allowed names only: a query is sent on to
        // the host's resolver, and its name is data that leaves (DNS exfiltration), whatever
        // addresses the guest may then connect to. (CIDRs name no names: under a CIDR-only
        // list no name is resolved.)
        let name = normalize_name(name);
        let host_name = name == super::HOST_NAME && !self.policy.allow_host_ports.is_empty();
        if self.policy.has_allow_list() && !self.name_allowed(&name) && !host_name {
            return Verdict::Refuse(format!("{name} is not in --allow-domain"));
        }
        Verdict::Allow
    }

    /// Filters the addresses the host resolver gave for `name`: those the guest could not
    /// connect to are dropped (DNS rebinding: a name that maps to the host or a private range
    /// is refused like the address itself), and each kept one is remembered as vouched for by
    /// `name`. Returns (kept, refused with the rule).
    pub fn check_resolved(&mut self, name: &str, addrs: &[IpAddr]) -> (Vec<IpAddr>, Vec<(IpAddr, String)>) {
        let name = normalize_name(name);
        let mut kept = Vec::new();
        let mut refused = Vec::new();
        for &ip in addrs {
            let v = if self.host.contains(ip) || canonical(ip).is_loopback() {
                Verdict::Refuse("the host's own address".into())
            } else if let Some(v) = self.special(ip) {
                v
            } else {
                Verdict::Allow
            };
            match v {
                Verdict::Refuse(rule) => refused.push((ip, rule)),
                _ => kept.push(ip),
            }
        }
        let until = Instant::now() + RESOLVED_FOR;
        for ip in &kept {
            let names = self.resolved.entry(canonical(*ip)).or_default();
            names.retain(|(n, t)| *n != name && *t > Instant::now());
            names.push((name.clone(), until));
        }
        (kept, refused)
    }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
