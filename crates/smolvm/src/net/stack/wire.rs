//! The wire to QEMU as a smoltcp device: Ethernet frames, 4-byte big-endian length first.

use super::*;

/// The wire to QEMU as a smoltcp device: frames in, length-prefixed frames out.
pub(super) struct Wire {
    pub(super) rx: VecDeque<Vec<u8>>,
    pub(super) tx: Vec<u8>,
    pub(super) tx_off: usize,
}

impl Wire {
    pub(super) fn pending_out(&self) -> usize {
        self.tx.len() - self.tx_off
    }
    pub(super) fn push_frame(&mut self, frame: &[u8]) {
        self.tx.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        self.tx.extend_from_slice(frame);
    }
}

pub(super) struct RxTok(Vec<u8>);
impl phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

pub(super) struct TxTok<'a>(&'a mut Vec<u8>);
impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let start = self.0.len();
        self.0.extend_from_slice(&(len as u32).to_be_bytes());
        self.0.resize(start + 4 + len, 0);
        f(&mut self.0[start + 4..])
    }
}

impl Device for Wire {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _: SInstant) -> Option<(RxTok, TxTok<'_>)> {
        if self.pending_out() >= MAX_WIRE_OUT {
            return None;
        }
        let f = self.rx.pop_front()?;
        Some((RxTok(f), TxTok(&mut self.tx)))
    }

    fn transmit(&mut self, _: SInstant) -> Option<TxTok<'_>> {
        (self.pending_out() < MAX_WIRE_OUT).then_some(TxTok(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = MTU;
        c
    }
}
