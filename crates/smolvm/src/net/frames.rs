//! Frames the network process builds itself rather than through smoltcp's sockets: UDP
//! replies (from any address the guest sent to) and TCP resets for refused connections.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
    TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

/// The two ends of the virtual wire.
#[derive(Debug, Clone, Copy)]
pub struct Macs {
    pub ours: EthernetAddress,
    pub guest: EthernetAddress,
}

const ETH: usize = 14;
const IP: usize = 20;

fn ipv4_frame(macs: Macs, src: Ipv4Addr, dst: Ipv4Addr, proto: IpProtocol, l4_len: usize) -> (Vec<u8>, Ipv4Repr) {
    let mut buf = vec![0u8; ETH + IP + l4_len];
    let eth = EthernetRepr { src_addr: macs.ours, dst_addr: macs.guest, ethertype: EthernetProtocol::Ipv4 };
    eth.emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
    let ip = Ipv4Repr { src_addr: src, dst_addr: dst, next_header: proto, payload_len: l4_len, hop_limit: 64 };
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[ETH..]), &ChecksumCapabilities::default());
    (buf, ip)
}

/// A UDP datagram from `src` to `dst` (the guest).
pub fn udp(macs: Macs, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let (mut buf, _) = ipv4_frame(macs, *src.ip(), *dst.ip(), IpProtocol::Udp, 8 + payload.len());
    let repr = UdpRepr { src_port: src.port(), dst_port: dst.port() };
    repr.emit(
        &mut UdpPacket::new_unchecked(&mut buf[ETH + IP..]),
        &IpAddress::Ipv4(*src.ip()),
        &IpAddress::Ipv4(*dst.ip()),
        payload.len(),
        |p| p.copy_from_slice(payload),
        &ChecksumCapabilities::default(),
    );
    buf
}

/// A reset answering a guest's SYN from `guest` to `to` with sequence number `seq`: the guest
/// sees "connection refused" at once.
pub fn tcp_reset(macs: Macs, to: SocketAddrV4, guest: SocketAddrV4, seq: TcpSeqNumber) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: to.port(),
        dst_port: guest.port(),
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(0),
        ack_number: Some(seq + 1),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let (mut buf, _) = ipv4_frame(macs, *to.ip(), *guest.ip(), IpProtocol::Tcp, repr.buffer_len());
    repr.emit(
        &mut TcpPacket::new_unchecked(&mut buf[ETH + IP..]),
        &IpAddress::Ipv4(*to.ip()),
        &IpAddress::Ipv4(*guest.ip()),
        &ChecksumCapabilities::default(),
    );
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn macs() -> Macs {
        Macs {
            ours: EthernetAddress([0x52, 0x55, 10, 0, 2, 2]),
            guest: EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        }
    }

    #[test]
    fn a_udp_reply_parses_back_with_valid_checksums() {
        let src: SocketAddrV4 = "198.51.100.10:7".parse().unwrap();
        let dst: SocketAddrV4 = "10.0.2.15:40000".parse().unwrap();
        let f = udp(macs(), src, dst, b"echo");
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!(eth.dst_addr(), macs().guest);
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        let u = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(u.verify_checksum(&IpAddress::Ipv4(*src.ip()), &IpAddress::Ipv4(*dst.ip())));
        assert_eq!((u.src_port(), u.dst_port(), u.payload()), (7, 40000, &b"echo"[..]));
    }

    #[test]
    fn a_reset_acknowledges_the_syn() {
        let to: SocketAddrV4 = "10.0.2.2:5432".parse().unwrap();
        let guest: SocketAddrV4 = "10.0.2.15:40000".parse().unwrap();
        let f = tcp_reset(macs(), to, guest, TcpSeqNumber(1000));
        let ip = Ipv4Packet::new_checked(&f[ETH..]).unwrap();
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(t.rst() && t.ack() && !t.syn());
        assert_eq!(t.ack_number(), TcpSeqNumber(1001));
        assert!(t.verify_checksum(&IpAddress::Ipv4(*to.ip()), &IpAddress::Ipv4(*guest.ip())));
    }
}
