//! Tests of `net::policy`: parsing, the ranges never allowed, the decider.

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn decider(p: NetworkPolicy) -> Decider {
    Decider::new(p, HostAddrs::fixed(vec![ip("192.0.2.1"), ip("198.51.100.77")]))
}

/// E2B's `allowOut: ["0.0.0.0/0"]` (or any wide CIDR) meant "everything", private ranges
/// and the metadata service included. Now a CIDR opens private ranges only with
/// `allow_private`, and link-local, loopback, multicast never.
#[test]
fn an_allowed_cidr_never_opens_the_metadata_service_and_private_ranges_only_when_asked() {
    let wide = NetworkPolicy {
        allow_cidrs: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
        ..Default::default()
    };
    let mut d = decider(wide.clone());
    for refused in [
        "169.254.169.254",
        "10.0.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "127.0.0.1",
        "224.0.0.1",
        "fe80::1",
        "fd00::1",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",
    ] {
        assert!(matches!(d.check_ip(ip(refused), true), Verdict::Refuse(_)), "{refused}");
    }
    assert_eq!(d.check_ip(ip("203.0.113.9"), true), Verdict::Allow);
    let (kept, refused) = d.check_resolved("rebind.test", &[ip("10.1.2.3"), ip("169.254.169.254"), ip("203.0.113.9")]);
    assert_eq!((kept.len(), refused.len()), (1, 2));
    let mut lan = decider(NetworkPolicy { allow_private: true, ..wide });
    assert_eq!(lan.check_ip(ip("10.0.0.1"), true), Verdict::Allow);
    assert_eq!(lan.check_ip(ip("fd00::1"), true), Verdict::Allow);
    for refused in ["169.254.169.254", "127.0.0.1", "224.0.0.1", "fe80::1", "192.0.2.1"] {
        assert!(matches!(lan.check_ip(ip(refused), true), Verdict::Refuse(_)), "{refused} with allow_private");
    }
    // allow_private without a CIDR that covers the address opens nothing.
    let mut narrow = decider(NetworkPolicy {
        allow_private: true,
        allow_cidrs: vec!["203.0.113.0/24".parse().unwrap()],
        ..Default::default()
    });
    assert!(matches!(narrow.check_ip(ip("10.0.0.1"), true), Verdict::Refuse(_)));
}

#[test]
fn domain_patterns_parse_and_match() {
    let d: DomainPattern = "A.Test.".parse().unwrap();
    assert!(d.matches("a.test") && d.matches("A.TEST.") && !d.matches("b.a.test"));
    let w: DomainPattern = "*.example.com".parse().unwrap();
    assert!(w.matches("x.example.com") && w.matches("a.b.example.com"));
    assert!(!w.matches("example.com") && !w.matches("badexample.com"));
    assert_eq!(w.to_string(), "*.example.com");
    for bad in ["", "-a.test", "a..test", "*.", "1.2.3.4", "a b", "*.*.x"] {
        assert!(bad.parse::<DomainPattern>().is_err(), "{bad:?} should be refused");
    }
}

#[test]
fn cidrs_parse_and_contain() {
    let c: Cidr = "203.0.113.0/24".parse().unwrap();
    assert!(c.contains(ip("203.0.113.10")) && !c.contains(ip("203.0.114.1")));
    assert!(c.contains(ip("::ffff:203.0.113.9")), "an IPv4-mapped address is its IPv4 address");
    let one: Cidr = "198.51.100.10".parse().unwrap();
    assert_eq!(one.to_string(), "198.51.100.10/32");
    let v6: Cidr = "2001:db8::/32".parse().unwrap();
    assert!(v6.contains(ip("2001:db8::1")) && !v6.contains(ip("2001:db9::1")));
    assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
    for bad in ["10.0.0.0/33", "x/8", "10.0.0.0/", "::/129"] {
        assert!(bad.parse::<Cidr>().is_err(), "{bad:?} should be refused");
    }
}

#[test]
fn internet_only_refuses_every_local_range() {
    let mut d = decider(NetworkPolicy::default());
    for refused in [
        "127.0.0.1",
        "127.255.0.9",
        "10.0.2.2",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "224.0.0.251",
        "255.255.255.255",
        "0.0.0.0",
        "192.0.2.1",     // the host's own interface (documentation range, but the host's)
        "198.51.100.77", // the host's own interface
        "::1",
        "fe80::1",
        "fd00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "64:ff9b::a9fe:a9fe",
    ] {
        assert!(matches!(d.check_ip(ip(refused), true), Verdict::Refuse(_)), "{refused} must be refused");
    }
    for allowed in ["8.8.8.8", "1.1.1.1", "198.51.100.10", "203.0.113.10", "172.32.0.1", "2001:4860::8888"] {
        assert_eq!(d.check_ip(ip(allowed), true), Verdict::Allow, "{allowed} is public");
    }
}

#[test]
fn none_refuses_everything() {
    let mut d = decider(NetworkPolicy::none());
    assert!(matches!(d.check_ip(ip("8.8.8.8"), true), Verdict::Refuse(r) if r == "network none"));
    assert!(matches!(d.check_query("a.test"), Verdict::Refuse(_)));
}

/// A CIDR on the list made the resolver answer any name through the host's resolver: the
/// name itself leaves the host (`<data>.attacker.example`).
#[test]
fn under_an_allow_list_only_allowed_names_are_resolved() {
    let cidr_only = NetworkPolicy { allow_cidrs: vec!["203.0.113.0/24".parse().unwrap()], ..Default::default() };
    let d = decider(cidr_only.clone());
    assert!(matches!(d.check_query("c2VjcmV0.exfil.example"), Verdict::Refuse(_)));
    let both = NetworkPolicy { allow_domains: vec!["*.a.test".parse().unwrap()], ..cidr_only };
    let d = decider(both);
    assert_eq!(d.check_query("api.a.test"), Verdict::Allow);
    assert!(matches!(d.check_query("c2VjcmV0.exfil.example"), Verdict::Refuse(_)));
    assert!(matches!(d.check_query(crate::net::HOST_NAME), Verdict::Refuse(_)), "no host port allowed");
    let host = NetworkPolicy { allow_host_ports: vec![8080], ..NetworkPolicy::default() };
    assert_eq!(decider(host).check_query(crate::net::HOST_NAME), Verdict::Allow);
    assert_eq!(decider(NetworkPolicy::default()).check_query("anything.example"), Verdict::Allow);
}

#[test]
fn allow_cidr_admits_its_range_only() {
    let p = NetworkPolicy { allow_cidrs: vec!["203.0.113.0/24".parse().unwrap()], ..Default::default() };
    let mut d = decider(p);
    assert_eq!(d.check_ip(ip("203.0.113.10"), true), Verdict::Allow);
    assert_eq!(d.check_ip(ip("203.0.113.10"), false), Verdict::Allow);
    assert!(matches!(d.check_ip(ip("198.51.100.10"), true), Verdict::Refuse(_)));
    assert!(matches!(d.check_ip(ip("127.0.0.1"), true), Verdict::Refuse(_)));
}

#[test]
fn allow_domain_needs_the_name_and_its_address() {
    let p = NetworkPolicy { allow_domains: vec!["a.test".parse().unwrap()], ..Default::default() };
    let mut d = decider(p);
    let shared = ip("198.51.100.10");
    // Before any lookup, the address is vouched for by nothing.
    assert!(matches!(d.check_ip(shared, true), Verdict::Refuse(_)));
    assert!(matches!(d.check_query("b.test"), Verdict::Refuse(_)));
    assert_eq!(d.check_query("a.test"), Verdict::Allow);
    let (kept, refused) = d.check_resolved("a.test", &[shared]);
    assert_eq!((kept.len(), refused.len()), (1, 0));
    assert_eq!(d.check_ip(shared, true), Verdict::NeedName);
    assert!(matches!(d.check_ip(shared, false), Verdict::Refuse(_)), "UDP cannot be checked by name");
    assert_eq!(d.check_name(shared, Some("A.test")), Verdict::Allow);
    assert!(matches!(d.check_name(shared, Some("b.test")), Verdict::Refuse(_)), "same IP, other name");
    assert!(matches!(d.check_name(shared, None), Verdict::Refuse(_)), "raw TCP names nothing");
    // The allowed name sent to an address it did not resolve to (domain fronting).
    assert!(matches!(d.check_name(ip("203.0.113.10"), Some("a.test")), Verdict::Refuse(_)));
}

#[test]
fn names_resolving_to_local_ranges_are_refused() {
    let mut d = decider(NetworkPolicy::default());
    let (kept, refused) =
        d.check_resolved("internal.example", &[ip("127.0.0.1"), ip("10.1.2.3"), ip("192.0.2.1"), ip("8.8.4.4")]);
    assert_eq!(kept, vec![ip("8.8.4.4")]);
    assert_eq!(refused.len(), 3);
}

#[test]
fn policies_round_trip_as_json_and_validate() {
    let p = NetworkPolicy {
        mode: NetworkMode::Nat,
        allow_domains: vec!["*.a.test".parse().unwrap()],
        allow_cidrs: vec!["203.0.113.0/24".parse().unwrap()],
        allow_host_ports: vec![11434],
        allow_private: false,
    };
    let j = serde_json::to_string(&p).unwrap();
    assert_eq!(
        j,
        r#"{"mode":"nat","allow_domains":["*.a.test"],"allow_cidrs":["203.0.113.0/24"],"allow_host_ports":[11434]}"#
    );
    assert_eq!(serde_json::from_str::<NetworkPolicy>(&j).unwrap(), p);
    assert!(serde_json::from_str::<NetworkPolicy>(r#"{"mode":"nat","allow_domains":["-x"]}"#).is_err());
    assert_eq!(serde_json::from_str::<NetworkPolicy>(r#"{"mode":"none"}"#).unwrap(), NetworkPolicy::none());
    let bad = NetworkPolicy { allow_cidrs: p.allow_cidrs.clone(), ..NetworkPolicy::none() };
    assert_eq!(bad.validate(), Err(PolicyError::NoneWithAllowList));
    assert_eq!(p.summary(), "nat, only *.a.test 203.0.113.0/24, host ports 11434");
}
