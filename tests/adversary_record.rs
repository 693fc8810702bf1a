//! A relay that records everything it is given: every request body, every
//! request plaintext (which it can read: requests are sealed to its key),
//! every upload and every stored message, plus its own database. After a
//! whole conversation — handshake, texts both ways, a profile update, a
//! queue rotation — none of the names, texts, profile status or invitation
//! keys appears anywhere in what it has, and the copies of one message on
//! two relays share nothing a relay could match.

mod adversary_common;
mod cli_common;

use std::sync::atomic::Ordering;

use adversary_common::*;
use cli_common::*;

/// A few 24-byte windows spread over `needle` (or the needle itself).
fn windows(needle: &[u8]) -> Vec<&[u8]> {
    if needle.len() <= 24 {
        return vec![needle];
    }
    let step = ((needle.len() - 24) / 6).max(1);
    needle.windows(24).step_by(step).collect()
}

/// Finds any of many needles in a haystack in one pass (a naive search per
/// needle is too slow in a debug build for megabytes of recordings).
struct Finder<'a> {
    /// Needle windows by their first two bytes.
    by_prefix: Vec<Vec<(&'a str, &'a [u8])>>,
}

impl<'a> Finder<'a> {
    fn new(needles: &'a [(String, Vec<u8>)]) -> Self {
        let mut by_prefix = vec![Vec::new(); 1 << 16];
        for (name, n) in needles {
            for w in windows(n) {
                assert!(w.len() >= 4, "needle {name:?} too short to search for");
                by_prefix[usize::from(u16::from_le_bytes([w[0], w[1]]))].push((name.as_str(), w));
            }
        }
        Finder { by_prefix }
    }

    fn find(&self, hay: &[u8]) -> Option<(&'a str, &'a [u8])> {
        for i in 0..hay.len().saturating_sub(1) {
            let list = &self.by_prefix[usize::from(u16::from_le_bytes([hay[i], hay[i + 1]]))];
            for &(name, w) in list {
                if hay[i..].starts_with(w) {
                    return Some((name, w));
                }
            }
        }
        None
    }
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

#[test]
fn a_recording_relay_learns_no_names_texts_or_keys() {
    let r1 = EvilRelay::start();
    let r2 = EvilRelay::start();
    for r in [&r1, &r2] {
        r.evil.record_requests.store(true, Ordering::SeqCst);
    }
    let a = profile("Zebrafinch Adelheid", &[&r1.addr, &r2.addr]);
    let b = profile("Okapi Bartholomew", &[&r2.addr, &r1.addr]);
    a.ok(&["profile", "--status", "status-Quokka-7731"]);

    let link = a.ok(&["invite", "--link", "--name", "bobby-local-name"]);
    let link = link.trim().to_string();
    let body = tern::proto::invitation::link_bytes(&link).expect("an invitation link");
    let (inv_i, inv_r) = (body[2..34].to_vec(), body[34..66].to_vec());
    b.ok(&["accept", &link, "--name", "addy-local-name"]);
    a.ok(&["recv"]);
    b.ok(&["recv"]);
    a.ok(&["recv"]);
    assert_eq!(a.contact("bobby-local-name")["state"], "connected");

    // As long as a message can be (18 bytes a repeat, up to MAX_BODY_LEN).
    let long: String = "Longbody-Pangolin-".repeat(tern::proto::envelope::MAX_BODY_LEN / 18);
    let texts_ab = [
        "the eagle lands at midnight on pier 39",
        "Ünïcödé ✓ geheimnis 秘密 🦜",
        long.as_str(),
    ];
    let texts_ba = ["meet me by the lighthouse-Narwhal", "bring the blue folder"];
    for t in texts_ab {
        a.send("bobby-local-name", t);
    }
    for t in texts_ba {
        b.send("addy-local-name", t);
    }
    assert_eq!(b.recv_texts().len(), texts_ab.len());
    assert_eq!(a.recv_texts().len(), texts_ba.len());
    a.ok(&["profile", "--status", "second-status-Axolotl"]);
    a.ok(&["rotate", "bobby-local-name"]);
    for _ in 0..3 {
        b.ok(&["recv"]);
        a.ok(&["recv"]);
    }
    a.send("bobby-local-name", "after rotation: Capybara-9");
    assert_eq!(b.recv_texts(), vec!["after rotation: Capybara-9"]);
    let code = a.ok(&["verify", "bobby-local-name"]);
    assert_eq!(code.trim(), b.ok(&["verify", "addy-local-name"]).trim());

    // Everything either relay holds or has seen.
    let mut haystacks: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, r) in [("r1", &r1), ("r2", &r2)] {
        for (i, q) in r.evil.requests().into_iter().enumerate() {
            haystacks.push((format!("{name} session message {i}"), q.message));
            if let Some(p) = q.frame {
                haystacks.push((format!("{name} frame plaintext {i} ({:?})", q.commands), p));
            }
        }
        for (i, d) in r.evil.delivered().into_iter().enumerate() {
            haystacks.push((format!("{name} delivered {i}"), d.delivered));
            if let Some(m) = d.message {
                haystacks.push((format!("{name} stored queue message {i}"), m));
            }
        }
        for f in files_under(r.data_dir()) {
            haystacks.push((
                format!("{name} file {}", f.display()),
                std::fs::read(&f).unwrap(),
            ));
        }
    }
    assert!(haystacks.len() > 50, "the relays saw the conversation");

    let mut needles: Vec<(String, Vec<u8>)> = Vec::new();
    let words = [
        "Zebrafinch",
        "Adelheid",
        "Okapi",
        "Bartholomew",
        "Quokka",
        "Axolotl",
        "bobby-local-name",
        "addy-local-name",
        "eagle lands",
        "geheimnis",
        "秘密",
        "lighthouse-Narwhal",
        "blue folder",
        "Pangolin",
        "Capybara",
    ];
    for w in words {
        needles.push((w.to_string(), w.as_bytes().to_vec()));
        needles.push((format!("{w} (UTF-16)"), utf16(w)));
        needles.push((format!("{w} (lower case)"), w.to_lowercase().into_bytes()));
    }
    needles.push(("invitation key I".into(), inv_i));
    needles.push(("invitation ratchet key R".into(), inv_r));
    let digits: String = code.chars().filter(char::is_ascii_digit).collect();
    needles.push(("security code".into(), digits.into_bytes()));
    let finder = Finder::new(&needles);
    // Positive controls: the search works, and the recordings are real
    // (the sender id of every upload is in some request plaintext the
    // relay read).
    let mut probe = b"......".to_vec();
    probe.extend_from_slice(long.as_bytes());
    assert!(finder.find(&probe).is_some());
    assert!(finder
        .find("x the eagle lands at midnight".as_bytes())
        .is_some());
    let sid = r1.evil.sent()[0].sender_id;
    assert!(haystacks
        .iter()
        .any(|(w, h)| w.contains("plaintext") && contains(h, &sid)));
    for (what, hay) in &haystacks {
        if let Some((n, w)) = finder.find(hay) {
            panic!(
                "the relay can see {n:?} in {what} (as {:?})",
                String::from_utf8_lossy(w)
            );
        }
        // The relay keeps no client addresses (its own address, which it
        // prints and remembers for `tern relay address`, is no client's).
        if what.contains("file") && !what.ends_with("/address") {
            assert!(!contains(hay, b"127.0.0.1"), "{what} holds an IP address");
        }
    }

    // Copies of one message on two relays are unlinkable byte for byte:
    // no upload to r1 shares a 32-byte window with any upload to r2
    // (connection requests excepted: PROTOCOL.md §14 says they are equal).
    let ups = |r: &EvilRelay| -> Vec<Vec<u8>> {
        r.evil
            .sent()
            .into_iter()
            .filter(|s| s.message[0] == 0x02)
            .map(|s| s.message[..15_937].to_vec())
            .collect()
    };
    let (u1, u2) = (ups(&r1), ups(&r2));
    assert!(u1.len() >= 5 && u2.len() >= 5);
    let mut set = std::collections::HashSet::new();
    for m in &u1 {
        for w in m.chunks(32).skip(1) {
            set.insert(w.to_vec());
        }
    }
    for m in &u2 {
        for w in m.windows(32).step_by(7) {
            assert!(
                !set.contains(w),
                "an upload to r2 shares bytes with an upload to r1"
            );
        }
    }
    // And what is stored or delivered never equals what was uploaded.
    for r in [&r1, &r2] {
        let uploaded: Vec<Vec<u8>> = r.evil.sent().into_iter().map(|s| s.message).collect();
        for d in r.evil.delivered() {
            for u in &uploaded {
                assert!(
                    !contains(&d.delivered, &u[1..64]),
                    "delivered bytes = uploaded bytes"
                );
            }
        }
    }
}
