//! `invitation`: the out-of-band invitation (link text and binary form) and
//! relay addresses (text and binary form), everything a QR code, a pasted
//! link or a config file can feed in.
//!
//! Input: one selector byte, then the payload.
//!
//! Invariants, besides "no panic":
//! - a decoded invitation re-encodes to exactly its input (the binary form
//!   is canonical), its link parses back to it, and so does its link in
//!   lower case and wrapped;
//! - every relay address that parses (text or binary) survives
//!   text → parse and binary → decode unchanged. The client persists
//!   addresses as text (`RecvQueue`/`PeerQueue` in the store), so an address
//!   that does not survive the round trip changes after a restart.

use std::str::FromStr;

use tern::proto::invitation::{decode_queues, link_of, Invitation};
use tern::proto::keys::Secret32;
use tern::proto::rekey::{parse_link, AnyInvitation};
use tern_wire::address::RelayAddress;
use tern_wire::codec::{Reader, Writer};

use super::input::Input;

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let rest = input.rest();
    match mode % 6 {
        // A pasted link, as typed.
        0 => {
            let text = String::from_utf8_lossy(rest);
            if let Ok(inv) = Invitation::from_link(&text) {
                check_invitation(&inv);
            }
            check_any(&text, None);
        }
        // A well-formed link around arbitrary binary content.
        1 => {
            let link = link_of(rest);
            if let Ok(inv) = Invitation::from_link(&link) {
                assert_eq!(inv.encode(), rest, "binary invitation is not canonical");
                check_invitation(&inv);
            }
            check_any(&link, Some(rest));
        }
        // The binary form.
        2 => {
            if let Ok(inv) = Invitation::decode(rest) {
                assert_eq!(inv.encode(), rest, "binary invitation is not canonical");
                check_invitation(&inv);
            }
        }
        // A relay address as text (relay lists, `tern relays add`).
        3 => {
            if let Ok(addr) = RelayAddress::from_str(&String::from_utf8_lossy(rest)) {
                check_address(&addr);
            }
        }
        // A relay address in binary form.
        4 => {
            let mut r = Reader::new(rest);
            if let Ok(addr) = RelayAddress::decode(&mut r) {
                let used = rest.len() - r.remaining();
                let mut w = Writer::new();
                addr.encode(&mut w);
                assert_eq!(
                    w.into_vec(),
                    &rest[..used],
                    "binary address is not canonical"
                );
                check_address(&addr);
            }
        }
        // A queue list (as in Hello and the rotation's QADD).
        _ => {
            let mut r = Reader::new(rest);
            if let Ok(queues) = decode_queues(&mut r) {
                for q in &queues {
                    check_address(&q.relay);
                }
            }
        }
    }
}

/// `tern accept`'s parser for any kind of link (contact, re-key, device).
fn check_any(link: &str, binary: Option<&[u8]>) {
    match parse_link(link) {
        Ok(AnyInvitation::Contact(inv)) => {
            assert_eq!(Invitation::from_link(link).as_ref(), Ok(&inv));
            check_invitation(&inv);
        }
        Ok(AnyInvitation::Device(inv)) => {
            // A device link is a contact invitation's body under kind 3: it
            // must never parse as a contact invitation, and must round-trip.
            assert!(Invitation::from_link(link).is_err());
            assert_eq!(
                parse_link(&inv.to_device_link()),
                Ok(AnyInvitation::Device(inv.clone()))
            );
            check_invitation(&inv);
        }
        Ok(AnyInvitation::Rekey(r)) => {
            if let Some(b) = binary {
                assert_eq!(r.encode(), b, "re-key invitation is not canonical");
            }
            // Not ours: the tag does not match, and it does not open.
            let secret = Secret32([9; 32]);
            if !r.is_for(&secret) {
                assert!(r.open(&secret).is_err());
            }
            let again = parse_link(&r.to_link());
            assert_eq!(again, Ok(AnyInvitation::Rekey(r)));
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fn check_invitation(inv: &Invitation) {
    let link = inv.to_link();
    assert_eq!(Invitation::from_link(&link).as_ref(), Ok(inv));
    let (a, b) = link.split_at(link.len() / 2);
    let mangled = format!(" {}\n\t{} ", a.to_lowercase(), b);
    assert_eq!(Invitation::from_link(&mangled).as_ref(), Ok(inv));
    for q in &inv.queues {
        assert!(q.relay.access_key.is_none());
        check_address(&q.relay);
    }
}

/// Text and binary round trips, and the derived strings.
pub fn check_address(addr: &RelayAddress) {
    let text = addr.to_string();
    let back = RelayAddress::from_str(&text);
    assert_eq!(
        back.as_ref(),
        Ok(addr),
        "relay address changes through its text form {text:?}"
    );
    let mut w = Writer::new();
    addr.encode(&mut w);
    let bytes = w.into_vec();
    let mut r = Reader::new(&bytes);
    assert_eq!(RelayAddress::decode(&mut r).as_ref(), Ok(addr));
    assert_eq!(r.remaining(), 0);
    let _ = (addr.endpoint(), addr.authority(), addr.label());
    // The access key is a credential: never in debug output.
    if let Some(key) = &addr.access_key {
        assert!(!format!("{addr:?}").contains(&format!(":{key}@")));
    }
}
