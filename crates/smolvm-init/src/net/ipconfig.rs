//! The kernel's `ip=` syntax (Documentation/admin-guide/nfs/nfsroot.rst), static form only:
//! `<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>`.

use std::net::Ipv4Addr;

/// A static IPv4 configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub hostname: Option<String>,
    pub device: String,
    pub dns: Vec<Ipv4Addr>,
}

impl IpConfig {
    /// `Ok(None)` for `off`/`none`: no interface wanted. An error names the bad field.
    pub fn parse(s: &str) -> Result<Option<IpConfig>, String> {
        if matches!(s, "" | "off" | "none") {
            return Ok(None);
        }
        if matches!(s, "dhcp" | "on" | "any" | "bootp" | "rarp" | "both") {
            return Err(format!("ip={s}: only the static form is supported"));
        }
        let f: Vec<&str> = s.split(':').collect();
        let field = |i: usize| f.get(i).copied().unwrap_or("");
        let ip = |i: usize, name: &str| -> Result<Option<Ipv4Addr>, String> {
            match field(i) {
                "" => Ok(None),
                v => v.parse().map(Some).map_err(|_| format!("{name} {v:?} is not an IPv4 address")),
            }
        };
        let address = ip(0, "client address")?.ok_or("client address is missing")?;
        let gateway = ip(2, "gateway")?;
        let prefix_len = match ip(3, "netmask")? {
            None => 24,
            Some(mask) => {
                let bits = u32::from(mask);
                if bits.leading_ones() + bits.trailing_zeros() != 32 {
                    return Err(format!("netmask {mask} is not contiguous"));
                }
                bits.leading_ones() as u8
            }
        };
        let hostname = Some(field(4)).filter(|h| !h.is_empty()).map(str::to_string);
        let device = match field(5) {
            "" => "eth0".to_string(),
            d => d.to_string(),
        };
        let dns = [ip(7, "dns0")?, ip(8, "dns1")?].into_iter().flatten().collect();
        Ok(Some(IpConfig { address, prefix_len, gateway, hostname, device, dns }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_form_the_host_writes() {
        let c = IpConfig::parse("10.0.2.15::10.0.2.2:255.255.255.0:box:eth0:off:10.0.2.3").unwrap().unwrap();
        assert_eq!(c.address, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(c.prefix_len, 24);
        assert_eq!(c.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(c.hostname.as_deref(), Some("box"));
        assert_eq!(c.device, "eth0");
        assert_eq!(c.dns, vec![Ipv4Addr::new(10, 0, 2, 3)]);
    }

    #[test]
    fn off_and_errors() {
        assert_eq!(IpConfig::parse("off"), Ok(None));
        assert!(IpConfig::parse("dhcp").unwrap_err().contains("static"));
        assert!(IpConfig::parse("10.0.2.300").unwrap_err().contains("client address"));
        assert!(IpConfig::parse("10.0.2.15::10.0.2.2:255.0.255.0").unwrap_err().contains("contiguous"));
        assert_eq!(IpConfig::parse("10.0.0.2").unwrap().unwrap().device, "eth0");
    }
}
