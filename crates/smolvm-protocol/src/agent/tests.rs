//! Tests of the agent protocol's framing, versions and conversions.

use super::*;

#[test]
fn a_failure_with_an_errno_reaches_an_older_peer_as_the_error_it_refines() {
    let f = GuestMsg::Failed { id: 3, message: "write /x: No space left on device".into(), errno: 28 };
    assert_eq!(f.as_failure(), Some(("write /x: No space left on device", Some(28))));
    assert_eq!(f.clone().for_version(6), f);
    let old = f.for_version(5);
    assert_eq!(old, GuestMsg::Error { id: 3, message: "write /x: No space left on device".into() });
    assert_eq!(old.as_failure(), Some(("write /x: No space left on device", None)));
    let none = GuestMsg::Failed { id: 3, message: "empty argv".into(), errno: 0 };
    assert_eq!(none.as_failure(), Some(("empty argv", None)), "0 is no errno");
}

#[test]
fn a_refresh_identity_grows_compatibly_and_hides_its_host_key() {
    // What a host before the host key sent: still read.
    let old: Identity = serde_json::from_str(r#"{"hostname":"a","authorized_key_b64":"eA=="}"#).unwrap();
    assert_eq!(old.host_key, None);
    // Without a key, the JSON is what it was (an older guest reads it unchanged).
    assert_eq!(serde_json::to_string(&old).unwrap(), r#"{"hostname":"a","authorized_key_b64":"eA=="}"#);
    let key = HostKey {
        private: PrivateText("-----BEGIN OPENSSH PRIVATE KEY-----".into()),
        public: "ssh-ed25519 AAAA".into(),
    };
    let new = Identity { host_key: Some(key), ..old };
    let json = serde_json::to_string(&new).unwrap();
    assert!(json.contains(r#""private":"-----BEGIN"#), "{json}");
    assert_eq!(serde_json::from_str::<Identity>(&json).unwrap(), new);
    assert!(!format!("{new:?}").contains("BEGIN"), "Debug shows no key: {new:?}");
}

#[test]
fn an_unknown_message_kind_still_names_its_request() {
    // Variant 200 (a kind from the future), id 300, then fields this side cannot read.
    let payload = [0xc8, 0x01, 0xac, 0x02, 0xff, 0xff];
    assert!(decode::<HostMsg>(&payload).is_err());
    assert_eq!(frame_id(&payload), Some((200, 300)));
    assert_eq!(frame_id(&[0x80]), None);
}

#[test]
fn hello_takes_the_form_of_the_negotiated_version() {
    let ready = Ready { v: 1, host_key: "k".into(), boot_us: BootPhases { init: 1, mounts: 2, network: 3, sshd: 4 } };
    for v in [1, 2] {
        let m = GuestMsg::hello(v, &ready);
        assert_eq!(m.since(), v, "{m:?}");
        assert_eq!(m.as_hello().unwrap().unwrap(), (v, ready.clone()));
    }
}

#[test]
fn a_full_chunk_fits_and_oversized_frames_are_refused() {
    let m = GuestMsg::Stdout { id: u32::MAX, data: vec![0xaa; CHUNK] };
    let frame = encode(&m);
    assert!(frame.len() - 4 <= CHUNK + CHUNK_OVERHEAD);
    let mut huge = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
    huge.extend_from_slice(&[0; 8]);
    assert!(matches!(read_frame::<GuestMsg>(&mut huge.as_slice()), Err(FrameError::TooLarge(_))));
    assert!(read_frame::<GuestMsg>(&mut [].as_slice()).unwrap().is_none());
}
