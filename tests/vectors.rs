//! Checks every file in `tests/vectors/` against the code, in both directions:
//!
//! 1. `examples/gen_vectors.rs` (included below) regenerates every file from
//!    its fixed seeds, and the result must equal the committed file byte for
//!    byte: any change to a wire format, a KDF label or an error fails here.
//! 2. Each stored case is then checked on its own, from the values it states:
//!    tern must produce the stored bytes from the stored inputs (encode, seal,
//!    encrypt with the recorded randomness), and must decode, open or decrypt
//!    the stored bytes to the stored values, or refuse them with the stored
//!    error. Where a case states intermediate values (HPKE key schedule,
//!    ratchet chain and message keys, handshake DH outputs), the independent
//!    reference implementation in the generator recomputes them too.
//!
//! tests/vectors/README.md documents the formats for other implementations.

#[path = "../examples/gen_vectors.rs"]
mod gen_vectors;

use std::collections::BTreeSet;

use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use serde::de::DeserializeOwned;

use gen_vectors::reference as refc;
use gen_vectors::*;
use tern::proto::device::{self, DeviceMsg};
use tern::proto::envelope::{ChainReceiver, Envelope};
use tern::proto::handshake::{joiner_agree, Agreement, InviterSecrets};
use tern::proto::hello::{Channel, Hello, HelloReply};
use tern::proto::invitation::Invitation;
use tern::proto::keys::{DhKeyPair, Secret32};
use tern::proto::queue_msg::{self, QueueMessage};
use tern::proto::ratchet::{Ratchet, RatchetInit};
use tern::proto::rekey::{parse_link, AnyInvitation};
use tern::proto::security_code::{codes_match, security_code};
use tern::wire::address::RelayAddress;
use tern::wire::delivery;
use tern::wire::frame::{FrameBuilder, FRAME_QUANTUM, MAX_FRAME_LEN};
use tern::wire::session::Fixed;
use tern::wire::{ClientHandshake, Command, Reply, ServerHandshake};

/// Files checked by a test below; `every_file_is_checked` keeps this honest.
const CHECKED: [&str; 18] = [
    "relay_address.json",
    "invitation.json",
    "session.json",
    "frames.json",
    "relay_commands.json",
    "relay_replies.json",
    "handshake.json",
    "security_code.json",
    "ratchet.json",
    "envelope.json",
    "envelope_chain.json",
    "queue_layer.json",
    "delivery.json",
    "hello.json",
    "device.json",
    "resync.json",
    "file.json",
    "receipt.json",
];

fn load<T: DeserializeOwned>(name: &str) -> Vec<T> {
    let path = vectors_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let cases: Vec<T> =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(!cases.is_empty(), "{name} has no cases");
    cases
}

fn valid(result: &str) -> bool {
    match result {
        "valid" => true,
        "invalid" => false,
        r => panic!("result must be valid or invalid, not {r:?}"),
    }
}

fn public_of(s: &[u8; 32]) -> [u8; 32] {
    DhKeyPair::from_secret(Secret32(*s)).public()
}

fn field<'a>(v: &'a Option<String>, name: &str, comment: &str) -> &'a str {
    v.as_deref()
        .unwrap_or_else(|| panic!("{comment}: missing {name}"))
}

// ---------------------------------------------------------------------------

#[test]
fn files_match_the_generator() {
    let generated = generate();
    let names: BTreeSet<&str> = generated.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, CHECKED.iter().copied().collect());
    for (name, text) in &generated {
        let path = vectors_dir().join(name);
        let stored =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if &stored == text {
            continue;
        }
        let a: Vec<serde_json::Value> = serde_json::from_str(&stored).unwrap();
        let b: Vec<serde_json::Value> = serde_json::from_str(text).unwrap();
        let at = a.iter().zip(&b).position(|(x, y)| x != y).map_or_else(
            || format!("{} stored cases, {} generated", a.len(), b.len()),
            |i| format!("first difference in case {i} ({})", a[i]["comment"]),
        );
        panic!(
            "tests/vectors/{name} is not what examples/gen_vectors.rs generates: {at}.\n\
             If the protocol change is intended, run `cargo run --example gen_vectors` \
             and review the diff."
        );
    }
}

#[test]
fn every_file_is_checked() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(vectors_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".json"))
        .collect();
    let checked: BTreeSet<String> = CHECKED.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        on_disk, checked,
        "a vector file without a checker, or a missing file"
    );
}

// ---------------------------------------------------------------------------

#[test]
fn relay_address_vectors() {
    let cases: Vec<AddressCase> = load("relay_address.json");
    let (mut ok, mut bad) = (0, 0);
    for c in &cases {
        let cm = &c.comment;
        if valid(&c.result) {
            let want = c.address.as_ref().expect("address").to_address();
            let text = field(&c.text, "text", cm);
            let bin = unhex(field(&c.binary, "binary", cm));
            assert_eq!(text.parse::<RelayAddress>().unwrap(), want, "{cm}: parse");
            assert_eq!(want.to_string(), text, "{cm}: display");
            let mut w = tern::wire::codec::Writer::new();
            want.encode(&mut w);
            assert_eq!(w.into_vec(), bin, "{cm}: encode");
            assert_eq!(decode_address(&bin).unwrap(), want, "{cm}: decode");
            for t in &c.also_accepted {
                assert_eq!(t.parse::<RelayAddress>().unwrap(), want, "{cm}: {t:?}");
            }
            ok += 1;
        } else {
            let err = field(&c.error, "error", cm);
            match (&c.text, &c.binary) {
                (Some(t), None) => match t.parse::<RelayAddress>() {
                    Ok(a) => panic!("{cm}: {t:?} parsed as {a}"),
                    Err(e) => assert_eq!(addr_err(&e), err, "{cm}"),
                },
                (None, Some(b)) => match decode_address(&unhex(b)) {
                    Ok(a) => panic!("{cm}: decoded as {a}"),
                    Err(e) => assert_eq!(addr_err(&e), err, "{cm}"),
                },
                _ => panic!("{cm}: an invalid case has exactly one input"),
            }
            bad += 1;
        }
    }
    assert!(ok >= 8 && bad >= 30, "{ok} valid, {bad} invalid");
}

#[test]
fn invitation_vectors() {
    let cases: Vec<InvitationCase> = load("invitation.json");
    let (mut ok, mut bad) = (0, 0);
    for c in &cases {
        let cm = &c.comment;
        if valid(&c.result) {
            let inv = c.invitation.as_ref().expect("invitation").to_invitation();
            let bin = unhex(field(&c.binary, "binary", cm));
            let link = field(&c.link, "link", cm);
            assert_eq!(inv.encode(), bin, "{cm}: encode");
            assert_eq!(inv.to_link(), link, "{cm}: link");
            assert_eq!(
                link,
                &link_ref::link(&bin),
                "{cm}: the link is TERN:, the base32 of the binary form and its checksum"
            );
            assert!(link_ref::verifies(link), "{cm}: the reference checksum");
            assert_eq!(Invitation::decode(&bin).unwrap(), inv, "{cm}: decode");
            assert_eq!(Invitation::from_link(link).unwrap(), inv, "{cm}: from_link");
            assert!(!c.also_accepted.is_empty());
            for l in &c.also_accepted {
                assert_eq!(Invitation::from_link(l).unwrap(), inv, "{cm}: {l:?}");
            }
            ok += 1;
        } else {
            let err = field(&c.error, "error", cm);
            let got = match (&c.binary, &c.link) {
                (Some(b), None) => Invitation::decode(&unhex(b)),
                (None, Some(l)) => Invitation::from_link(l),
                _ => panic!("{cm}: an invalid case has exactly one input"),
            };
            match got {
                Ok(i) => panic!("{cm}: decoded as {i:?}"),
                Err(e) => assert_eq!(proto_err(&e), err, "{cm}"),
            }
            if let Some(l) = &c.link {
                let l = l.to_ascii_uppercase();
                if l.starts_with("TERN:") {
                    assert_eq!(
                        !link_ref::verifies(&l),
                        err == "link_damaged",
                        "{cm}: the reference checksum agrees"
                    );
                }
            }
            bad += 1;
        }
    }
    assert!(ok >= 3 && bad >= 30, "{ok} valid, {bad} invalid");
}

/// Checks a valid session case: tern's handshake from the recorded inputs
/// in the roles it plays, the reference's symmetric state step by step,
/// and every transport message both ways.
fn check_session(c: &SessionCase) {
    let cm = &c.comment;
    let f = |v: &Option<String>, n: &str| unhex(field(v, n, cm));
    let relay_secret: [u8; 32] = arr(field(&c.relay_static_secret, "relay_static_secret", cm));
    let relay_public: [u8; 32] = arr(field(&c.relay_static_public, "relay_static_public", cm));
    let client_e: [u8; 32] = arr(field(
        &c.client_ephemeral_secret,
        "client_ephemeral_secret",
        cm,
    ));
    let relay_e: [u8; 32] = arr(field(
        &c.relay_ephemeral_secret,
        "relay_ephemeral_secret",
        cm,
    ));
    let kem_seed: [u8; 64] = arr(field(&c.kem_seed, "kem_seed", cm));
    let kem_m: [u8; 32] = arr(field(&c.kem_m, "kem_m", cm));
    let msg1 = f(&c.message1, "message1");
    let msg2 = f(&c.message2, "message2");
    let hash = f(&c.handshake_hash, "handshake_hash");
    let info = c.relay_info.expect("relay_info");
    assert_eq!(public_of(&relay_secret), relay_public, "{cm}");
    assert_eq!(
        hex(&public_of(&client_e)),
        field(&c.client_ephemeral_public, "e", cm)
    );
    assert_eq!(
        hex(&public_of(&relay_e)),
        field(&c.relay_ephemeral_public, "re", cm)
    );

    // The reference, from the recorded inputs only.
    let (ek, dk) = wire_ref::kem_keygen(&kem_seed);
    assert_eq!(
        hex(&ek),
        field(&c.kem_encapsulation_key, "ek", cm),
        "{cm}: ek"
    );
    let versions = (c.client_min_version.unwrap(), c.client_max_version.unwrap());
    let hello = wire_ref::client_hello(versions.0, versions.1, &ek);
    assert_eq!(hex(&hello), field(&c.client_hello, "client_hello", cm));
    let mut cs = wire_ref::initial(&relay_public);
    assert_eq!(
        wire_ref::write_message1(&mut cs, &client_e, &relay_public, &hello),
        msg1,
        "{cm}"
    );
    let mut rs = wire_ref::initial(&relay_public);
    assert_eq!(
        wire_ref::read_message1(&mut rs, &relay_secret, &msg1),
        Some(hello.clone())
    );
    let (ct, ss) = wire_ref::kem_encapsulate(&ek, &kem_m);
    assert_eq!(
        hex(&ct),
        field(&c.kem_ciphertext, "kem_ciphertext", cm),
        "{cm}: ct"
    );
    assert_eq!(
        hex(&ss),
        field(&c.kem_shared_secret, "kem_shared_secret", cm),
        "{cm}: ss"
    );
    assert_eq!(wire_ref::kem_decapsulate(&dk, &ct), ss);
    let server_hello = wire_ref::server_hello(2, &info);
    assert_eq!(
        hex(&server_hello),
        field(&c.server_hello, "server_hello", cm)
    );
    let noise2 =
        wire_ref::write_message2(&mut rs, &relay_e, &public_of(&client_e), &ss, &server_hello);
    assert_eq!(
        [ct.clone(), noise2.clone()].concat(),
        msg2,
        "{cm}: message 2"
    );
    assert_eq!(
        wire_ref::read_message2(&mut cs, &client_e, &noise2, &ss),
        Some(server_hello)
    );
    assert_eq!(cs.h.to_vec(), hash, "{cm}: handshake hash");
    assert_eq!(
        hex(&refc::x25519(&client_e, &relay_public)),
        field(&c.es, "es", cm)
    );
    assert_eq!(
        hex(&refc::x25519(&client_e, &public_of(&relay_e))),
        field(&c.ee, "ee", cm)
    );
    assert_eq!(cs.trace.len(), c.symmetric_state.len(), "{cm}: steps");
    for (mine, theirs) in cs.trace.iter().zip(&c.symmetric_state) {
        assert_eq!(mine.op, theirs.op, "{cm}");
        assert_eq!(hex(&mine.ck), theirs.ck, "{cm}: ck after {}", theirs.op);
        assert_eq!(hex(&mine.h), theirs.h, "{cm}: h after {}", theirs.op);
        assert_eq!(
            mine.k.map(|k| hex(&k)),
            theirs.k,
            "{cm}: k after {}",
            theirs.op
        );
    }
    let (k1, k2) = cs.split();
    assert_eq!(
        hex(&k1),
        field(&c.client_to_relay_key, "client_to_relay_key", cm)
    );
    assert_eq!(
        hex(&k2),
        field(&c.relay_to_client_key, "relay_to_client_key", cm)
    );

    // tern's relay: reads message 1, writes message 2.
    assert!(c.roles.iter().any(|r| r == "relay"), "{cm}: roles");
    let (mut server, got2, offered) = ServerHandshake::respond_fixed(
        &relay_secret,
        &msg1,
        &info.to_info(),
        Fixed {
            ephemeral: &relay_e,
            kem: &kem_m,
        },
    )
    .unwrap_or_else(|e| panic!("{cm}: the relay refused message 1: {e}"));
    assert_eq!(got2, msg2, "{cm}: tern's message 2");
    assert_eq!((offered.min_version, offered.max_version), versions);
    assert_eq!(server.hash().to_vec(), hash, "{cm}: relay's hash");
    if !c.roles.iter().any(|r| r == "client") {
        assert!(c.transport.is_empty(), "{cm}: transport needs both sides");
        return;
    }
    // tern's client: writes message 1, reads message 2.
    let (client, got1) = ClientHandshake::start_fixed(
        &relay_public,
        Fixed {
            ephemeral: &client_e,
            kem: &kem_seed,
        },
    )
    .unwrap();
    assert_eq!(got1, msg1, "{cm}: tern's message 1");
    let (mut client, got_info) = client.finish(&msg2).unwrap_or_else(|e| panic!("{cm}: {e}"));
    assert_eq!(RelayInfoFields::of(&got_info), info, "{cm}: relay info");
    assert_eq!(client.hash().to_vec(), hash, "{cm}: client's hash");

    let mut counters = [0u64; 2];
    for m in &c.transport {
        let frame = m.frame.bytes();
        let message = unhex(&m.message);
        let (sealer, opener, key, n) = match m.direction.as_str() {
            CLIENT_TO_RELAY => (&mut client, &mut server, k1, &mut counters[0]),
            RELAY_TO_CLIENT => (&mut server, &mut client, k2, &mut counters[1]),
            d => panic!("{cm}: direction {d}"),
        };
        assert_eq!(m.nonce, *n, "{cm}: nonces count up from 0 each way");
        *n += 1;
        assert_eq!(sealer.seal(&frame).unwrap(), message, "{cm}: seal");
        assert_eq!(opener.open(&message).unwrap(), frame, "{cm}: open");
        assert_eq!(
            wire_ref::encrypt(&key, m.nonce, &[], &frame),
            message,
            "{cm}: reference"
        );
        let direction = if m.direction == CLIENT_TO_RELAY {
            "commands"
        } else {
            "replies"
        };
        assert!(
            parse_frame(direction, &frame).is_ok(),
            "{cm}: the frame parses"
        );
    }
}

#[test]
fn session_vectors() {
    let cases: Vec<SessionCase> = load("session.json");
    let (mut ok, mut bad) = (0, [0; 3]);
    for c in &cases {
        let cm = &c.comment;
        if valid(&c.result) {
            check_session(c);
            ok += 1;
            continue;
        }
        let err = field(&c.error, "error", cm);
        let base = &cases[c.of_case.expect("of_case")];
        assert!(
            valid(&base.result) && base.roles.len() == 2,
            "{cm}: of_case"
        );
        let mutate = |b: Vec<u8>| c.mutation.as_ref().map_or(b.clone(), |m| m.apply(&b));
        let input = |own: &Option<String>, of: &Option<String>| match own {
            Some(h) => {
                assert!(
                    c.mutation.is_none(),
                    "{cm}: an input or a mutation, not both"
                );
                unhex(h)
            }
            None => mutate(unhex(of.as_deref().unwrap())),
        };
        let relay_public: [u8; 32] = arr(base.relay_static_public.as_deref().unwrap());
        let got = match c.target.as_deref() {
            Some("message1") => {
                bad[0] += 1;
                relay_respond(base, &input(&c.message1, &base.message1)).map(|_| ())
            }
            Some("message2") => {
                bad[1] += 1;
                client_start(base, &relay_public)
                    .finish(&input(&c.message2, &base.message2))
                    .map(|_| ())
            }
            Some("transport") => {
                bad[2] += 1;
                let direction = c.direction.as_deref().expect("direction");
                let (mut client, mut server) = tern_session_pair(base);
                let receiver = match direction {
                    CLIENT_TO_RELAY => &mut server,
                    RELAY_TO_CLIENT => &mut client,
                    d => panic!("{cm}: direction {d}"),
                };
                let msgs: Vec<&TransportMessage> = base
                    .transport
                    .iter()
                    .filter(|m| m.direction == direction)
                    .collect();
                let (last, before) = c.open.split_last().expect("open");
                for i in before {
                    let m = msgs[*i];
                    assert_eq!(
                        receiver.open(&unhex(&m.message)).unwrap(),
                        m.frame.bytes(),
                        "{cm}"
                    );
                }
                receiver
                    .open(&mutate(unhex(&msgs[*last].message)))
                    .map(|_| ())
            }
            t => panic!("{cm}: target {t:?}"),
        };
        assert_eq!(
            got.map_err(|e| session_err(&e)),
            Err(err.to_string()),
            "{cm}"
        );
    }
    assert!(
        ok >= 2 && bad.iter().all(|&n| n >= 7),
        "{ok} valid, {bad:?} invalid"
    );
}

#[test]
fn frame_vectors() {
    let cases: Vec<FrameCase> = load("frames.json");
    let (mut ok, mut bad) = (0, 0);
    for c in &cases {
        let cm = &c.comment;
        let replies = match c.direction.as_str() {
            "commands" => false,
            "replies" => true,
            d => panic!("{cm}: direction {d}"),
        };
        if valid(&c.result) {
            let records: Vec<Vec<u8>> = c.records.iter().map(Padded::bytes).collect();
            let frames = frame_bytes(c);
            assert_eq!(
                c.frames.iter().map(|f| f.records).sum::<usize>(),
                records.len(),
                "{cm}: every record in a frame"
            );
            if !c.parse_only {
                // Encode: tern packs the records into exactly these frames.
                let mut b = FrameBuilder::new();
                for r in &records {
                    b.push(r);
                }
                assert_eq!(b.finish(), frames, "{cm}: packing");
                assert_eq!(wire_ref::pack(&records), frames, "{cm}: reference packing");
                assert_eq!(frame_layout(&records), c.frames, "{cm}: layout");
            }
            // Decode: the frames give back the records, in order.
            let mut got = Vec::new();
            for f in &frames {
                assert_eq!(f.len() % FRAME_QUANTUM, 0, "{cm}");
                assert!(f.len() <= MAX_FRAME_LEN, "{cm}");
                got.extend(parse_frame(&c.direction, f).unwrap_or_else(|e| panic!("{cm}: {e}")));
                assert!(
                    wire_ref::split(f, replies).is_some(),
                    "{cm}: reference split"
                );
            }
            assert_eq!(got, records, "{cm}: records");
            ok += 1;
        } else {
            let frame = c.frame.as_ref().expect("frame").bytes();
            match parse_frame(&c.direction, &frame) {
                Ok(r) => panic!("{cm}: parsed as {} records", r.len()),
                Err(e) => assert_eq!(wire_err(&e), field(&c.error, "error", cm), "{cm}"),
            }
            assert_eq!(wire_ref::split(&frame, replies), None, "{cm}: reference");
            bad += 1;
        }
    }
    assert!(ok >= 8 && bad >= 12, "{ok} valid, {bad} invalid");
}

#[test]
fn relay_command_vectors() {
    let cases: Vec<CommandCase> = load("relay_commands.json");
    let (mut ok, mut refused_sig, mut bad) = (0, 0, 0);
    let mut names = BTreeSet::new();
    for c in &cases {
        let cm = &c.comment;
        let rec = c.record.bytes();
        if !valid(&c.result) {
            let err = field(&c.error, "error", cm);
            match decode_command(&rec) {
                Ok(_) => panic!("{cm}: decoded"),
                Err(e) => assert_eq!(wire_err(&e), err, "{cm}"),
            }
            // In a frame too, unless the padding would complete the record
            // (or the record starts with 0x00, which there ends the records).
            if err != "truncated" && rec.first() != Some(&0) {
                let mut frame = rec.clone();
                frame.resize(tern::wire::frame::padded_len(rec.len()), 0);
                let e = tern::wire::frame::parse_commands(&frame).unwrap_err();
                assert_eq!(wire_err(&e), err, "{cm}: in a frame");
            }
            bad += 1;
            continue;
        }
        let fields = c.command.as_ref().expect("command");
        let cmd = fields.to_command();
        names.insert(fields.name.clone());
        let hash: [u8; 32] = arr(field(&c.session_hash, "session_hash", cm));
        let signer = c
            .signing_key
            .as_deref()
            .map(|k| SigningKey::from_bytes(&arr(k)));
        // Encode: from the fields, the session hash and the key (when tern
        // can produce this record: not for the doctored signatures).
        if c.signed_for.is_none() && (signer.is_some() || c.signature.is_none()) {
            assert_eq!(
                command_record(fields.tag, &cmd, &hash, signer.as_ref()),
                rec,
                "{cm}: encode"
            );
            assert_eq!(
                wire_ref::command_record(fields, &hash, signer.as_ref()),
                rec,
                "{cm}: reference"
            );
        }
        // Decode: the whole record, alone and in a frame.
        let req = decode_command(&rec).unwrap_or_else(|e| panic!("{cm}: {e}"));
        assert!(req.command == cmd && req.tag == fields.tag, "{cm}: decode");
        assert_eq!(
            req.signature.map(|s| hex(&s)),
            c.signature,
            "{cm}: signature"
        );
        assert_eq!(wire_ref::command_len(&rec), Some(rec.len()), "{cm}: length");
        let mut frame = rec.clone();
        frame.resize(tern::wire::frame::padded_len(rec.len()), 0);
        assert_eq!(
            tern::wire::frame::parse_commands(&frame).unwrap(),
            vec![req.clone()],
            "{cm}"
        );
        match (
            &c.signature,
            c.signed_len,
            &c.verifying_key,
            c.valid_signature,
        ) {
            (None, None, None, None) => {
                assert!(!req.verify(&hash, &[0; 32]), "{cm}: unsigned verified");
                ok += 1;
            }
            (Some(sig), Some(n), Some(vk), Some(expect)) => {
                let vk: [u8; 32] = arr(vk);
                assert_eq!(signature_offset(&cmd), Some(n), "{cm}: signature offset");
                assert_eq!(hex(&rec[n..]), *sig, "{cm}: signature field");
                assert_eq!(req.verify(&hash, &vk), expect, "{cm}: verify");
                // Independently: strict Ed25519 over context || hash || prefix.
                let strict = VerifyingKey::from_bytes(&vk).is_ok_and(|k| {
                    k.verify_strict(
                        &wire_ref::signed_message(&hash, &rec[..n]),
                        &Signature::from_bytes(&arr(sig)),
                    )
                    .is_ok()
                });
                assert_eq!(strict, expect, "{cm}: strict Ed25519");
                if let Some(f) = &c.signed_for {
                    assert!(
                        req.verify(&arr(f), &arr(c.verifying_key.as_deref().unwrap())) || !expect
                    );
                }
                if expect {
                    // Bound to the session: another hash refuses it.
                    let mut other = hash;
                    other[31] ^= 1;
                    assert!(!req.verify(&other, &vk), "{cm}: session hash not bound");
                    ok += 1;
                } else {
                    refused_sig += 1;
                }
            }
            _ => panic!("{cm}: signature fields must all be present or all absent"),
        }
    }
    assert_eq!(names.len(), 10, "every command: {names:?}");
    assert!(
        ok >= 15 && refused_sig >= 7 && bad >= 11,
        "{ok}/{refused_sig}/{bad}"
    );
}

#[test]
fn relay_reply_vectors() {
    let cases: Vec<ReplyCase> = load("relay_replies.json");
    let (mut ok, mut bad) = (0, 0);
    let mut kinds = BTreeSet::new();
    let mut codes = BTreeSet::new();
    for c in &cases {
        let cm = &c.comment;
        let rec = c.record.bytes();
        if valid(&c.result) {
            let fields = c.reply.as_ref().expect("reply");
            let reply = fields.to_reply();
            kinds.insert(fields.kind.clone());
            if let Reply::Error(code) = reply {
                codes.insert(code as u8);
            }
            assert_eq!(reply_record(fields.tag, &reply), rec, "{cm}: encode");
            assert_eq!(wire_ref::reply_record(fields), rec, "{cm}: reference");
            assert_eq!(
                decode_reply(&rec).unwrap(),
                (fields.tag, reply),
                "{cm}: decode"
            );
            assert_eq!(wire_ref::reply_len(&rec), Some(rec.len()), "{cm}: length");
            ok += 1;
        } else {
            let err = field(&c.error, "error", cm);
            match decode_reply(&rec) {
                Ok(r) => panic!("{cm}: decoded as {r:?}"),
                Err(e) => assert_eq!(wire_err(&e), err, "{cm}"),
            }
            if err != "truncated" && rec.first() != Some(&0) {
                let mut frame = rec.clone();
                frame.resize(tern::wire::frame::padded_len(rec.len()), 0);
                let e = tern::wire::frame::parse_replies(&frame).unwrap_err();
                assert_eq!(wire_err(&e), err, "{cm}: in a frame");
            }
            bad += 1;
        }
    }
    assert_eq!(kinds.len(), 8, "every reply kind: {kinds:?}");
    assert_eq!(codes, (1..=12).collect(), "every error code");
    assert!(ok >= 19 && bad >= 12, "{ok} valid, {bad} invalid");
}

fn check_agreement(a: &Agreement, c: &HandshakeCase, side: &str) {
    let cm = format!("{}: {side}", c.comment);
    let f = |v: &Option<String>, n: &str| field(v, n, &cm).to_string();
    assert_eq!(
        hex(&a.keys.invitation_hash),
        f(&c.invitation_hash, "invitation_hash"),
        "{cm}"
    );
    assert_eq!(hex(&a.keys.invitation), c.invitation_key, "{cm}");
    assert_eq!(hex(&a.keys.inviter_ratchet), c.inviter_ratchet_key, "{cm}");
    assert_eq!(hex(&a.keys.joiner_identity), c.joiner_identity_key, "{cm}");
    assert_eq!(
        hex(&a.keys.joiner_ephemeral),
        c.joiner_ephemeral_key,
        "{cm}"
    );
    assert_eq!(
        hex(&a.keys.transcript()),
        f(&c.transcript, "transcript"),
        "{cm}"
    );
    assert_eq!(
        hex(&a.ratchet.ad),
        f(&c.transcript, "transcript"),
        "{cm}: ad"
    );
    assert_eq!(
        hex(a.ratchet.root_key.as_bytes()),
        f(&c.root_key, "root_key"),
        "{cm}"
    );
    assert_eq!(
        hex(a.ratchet.header_key_initiator.as_bytes()),
        f(&c.header_key_initiator, "header_key_initiator"),
        "{cm}"
    );
    assert_eq!(
        hex(a.ratchet.header_key_responder.as_bytes()),
        f(&c.header_key_responder, "header_key_responder"),
        "{cm}"
    );
    assert_eq!(
        hex(a.connection_secret.as_bytes()),
        f(&c.connection_secret, "connection_secret"),
        "{cm}"
    );
}

#[test]
fn handshake_vectors() {
    let cases: Vec<HandshakeCase> = load("handshake.json");
    let (mut ok, mut bad) = (0, 0);
    for c in &cases {
        let cm = &c.comment;
        let keys: Vec<[u8; 32]> = [
            &c.invitation_key,
            &c.inviter_ratchet_key,
            &c.joiner_identity_key,
            &c.joiner_ephemeral_key,
        ]
        .iter()
        .map(|k| arr(k))
        .collect();
        // The invitation's hash, from its stored binary form (§5.2); the
        // invalid cases fail before the transcript matters.
        let inv_hash: [u8; 32] = match (&c.invitation, &c.invitation_hash) {
            (Some(b), Some(h)) => {
                let bin = unhex(b);
                let inv = tern::proto::invitation::Invitation::decode(&bin)
                    .unwrap_or_else(|e| panic!("{cm}: invitation: {e}"));
                assert_eq!(inv.invitation_key, keys[0], "{cm}: I in the invitation");
                assert_eq!(inv.ratchet_key, keys[1], "{cm}: R in the invitation");
                assert_eq!(hex(&tern::proto::handshake::invitation_hash(&bin)), *h);
                assert_eq!(hex(&refc::invitation_hash(&bin)), *h);
                arr(h)
            }
            (None, None) => [0; 32],
            _ => panic!("{cm}: both invitation and its hash, or neither"),
        };
        let inviter = match (&c.invitation_secret, &c.inviter_ratchet_secret) {
            (Some(i), Some(r)) => {
                let s = InviterSecrets {
                    invitation: DhKeyPair::from_secret(Secret32(arr(i))),
                    ratchet: DhKeyPair::from_secret(Secret32(arr(r))),
                    invitation_hash: inv_hash,
                };
                assert_eq!(s.invitation.public(), keys[0], "{cm}: I");
                assert_eq!(s.ratchet.public(), keys[1], "{cm}: R");
                Some(s.agree(&keys[2], &keys[3]))
            }
            (None, None) => None,
            _ => panic!("{cm}: both inviter secrets or neither"),
        };
        let joiner = match (&c.joiner_identity_secret, &c.joiner_ephemeral_secret) {
            (Some(j), Some(e)) => {
                let (j, e): ([u8; 32], [u8; 32]) = (arr(j), arr(e));
                assert_eq!(public_of(&j), keys[2], "{cm}: J");
                assert_eq!(public_of(&e), keys[3], "{cm}: E");
                let mut rng = FixedRng::new(&[j, e].concat());
                let r = joiner_agree(&inv_hash, &keys[0], &keys[1], &mut rng);
                rng.assert_used_up(cm);
                Some(r)
            }
            (None, None) => None,
            _ => panic!("{cm}: both joiner secrets or neither"),
        };
        assert!(
            inviter.is_some() || joiner.is_some(),
            "{cm}: nothing to compute"
        );
        if valid(&c.result) {
            let (i, j) = (inviter.unwrap().unwrap(), joiner.unwrap().unwrap());
            check_agreement(&i, c, "inviter");
            check_agreement(&j, c, "joiner");
            // Independently: the three DH values, the transcript, the KDF, the code.
            let sec = |v: &Option<String>| arr::<32>(v.as_ref().unwrap());
            let dh = [
                refc::x25519(&sec(&c.joiner_identity_secret), &keys[1]),
                refc::x25519(&sec(&c.joiner_ephemeral_secret), &keys[0]),
                refc::x25519(&sec(&c.joiner_ephemeral_secret), &keys[1]),
            ];
            assert_eq!(
                dh[0],
                refc::x25519(&sec(&c.inviter_ratchet_secret), &keys[2])
            );
            assert_eq!(dh[1], refc::x25519(&sec(&c.invitation_secret), &keys[3]));
            assert_eq!(
                dh[2],
                refc::x25519(&sec(&c.inviter_ratchet_secret), &keys[3])
            );
            for (d, v) in dh.iter().zip([&c.dh1, &c.dh2, &c.dh3]) {
                assert_eq!(hex(d), *field(v, "dh", cm), "{cm}");
            }
            let th = refc::transcript(&inv_hash, &keys[0], &keys[1], &keys[2], &keys[3]);
            assert_eq!(hex(&th), field(&c.transcript, "transcript", cm));
            let k = refc::handshake_keys(&th, dh);
            let names = [
                &c.root_key,
                &c.header_key_initiator,
                &c.header_key_responder,
                &c.connection_secret,
            ];
            for (v, s) in k.iter().zip(names) {
                assert_eq!(hex(v), *field(s, "key", cm), "{cm}");
            }
            let code = field(&c.security_code, "security_code", cm);
            assert_eq!(security_code(&th), code, "{cm}");
            assert_eq!(refc::security_code(&th), code, "{cm}");
            ok += 1;
        } else {
            let err = field(&c.error, "error", cm);
            for r in [inviter, joiner].into_iter().flatten() {
                match r {
                    Ok(_) => panic!("{cm}: agreed"),
                    Err(e) => assert_eq!(proto_err(&e), err, "{cm}"),
                }
            }
            bad += 1;
        }
    }
    assert!(ok >= 3 && bad >= 6, "{ok} valid, {bad} invalid");
}

#[test]
fn security_code_vectors() {
    let cases: Vec<SecurityCodeCase> = load("security_code.json");
    let (mut derived, mut typed) = (0, 0);
    for c in &cases {
        let cm = &c.comment;
        if let Some(t) = &c.transcript {
            let th: [u8; 32] = arr(t);
            let d = refc::sha256(&[b"tern/v1 security code", &th]);
            assert_eq!(hex(&d), field(&c.digest, "digest", cm), "{cm}");
            assert_eq!(security_code(&th), c.code, "{cm}");
            assert_eq!(refc::security_code(&th), c.code, "{cm}");
            derived += 1;
        }
        if let Some(t) = &c.typed {
            assert_eq!(codes_match(&c.code, t), c.matches.expect("matches"), "{cm}");
            typed += 1;
        }
    }
    assert!(derived >= 6 && typed >= 6, "{derived}/{typed}");
}

// ---------------------------------------------------------------------------
// The ratchet conversations, with an independent model of the key schedule.

/// One party's sending-side key schedule, tracked from the vector's values.
struct Track {
    /// The ML-KEM seed of the key pair our chain publishes, its key, and
    /// the chain's ciphertext (empty: none).
    kem_seed: Option<Vec<u8>>,
    kem_ek: Vec<u8>,
    kem_ct: Vec<u8>,
    dh_secret: [u8; 32],
    rk: [u8; 32],
    cks: Option<[u8; 32]>,
    hks: Option<[u8; 32]>,
    nhks: [u8; 32],
    nhkr: [u8; 32],
    ns: u32,
    pn: u32,
}

struct Sent {
    ek: Vec<u8>,
    ct: Vec<u8>,
    bytes: Vec<u8>,
    plaintext: String,
    chain_key: [u8; 32],
    header_key: [u8; 32],
    dh: [u8; 32],
    n: u32,
}

fn check_conversation(case: &RatchetCase) -> (usize, usize) {
    let cm = &case.comment;
    let i = &case.init;
    let k = |s: &str| arr::<32>(s);
    let init = RatchetInit {
        root_key: Secret32(k(&i.root_key)),
        header_key_initiator: Secret32(k(&i.header_key_initiator)),
        header_key_responder: Secret32(k(&i.header_key_responder)),
        ad: k(&i.ad),
    };
    let (a_secret, b_secret) = (
        k(&i.initiator_ratchet_secret),
        k(&i.responder_ratchet_secret),
    );
    let b_public = k(&i.responder_ratchet_key);
    assert_eq!(public_of(&b_secret), b_public, "{cm}");
    assert_eq!(public_of(&a_secret), k(&i.initiator_ratchet_key), "{cm}");
    let a_kem = unhex(&i.initiator_kem_seed);
    assert_eq!(a_kem.len(), 64, "{cm}");
    assert_eq!(hex(&refc::kem_keygen(&a_kem)), i.initiator_kem_key, "{cm}");
    let mut rng = FixedRng::new(&[&a_secret[..], &a_kem].concat());
    let alice = Ratchet::init_initiator(&init, &b_public, &mut rng).unwrap();
    rng.assert_used_up(cm);
    let bob = Ratchet::init_responder(&init, DhKeyPair::from_secret(Secret32(b_secret)));
    let mut parties = [alice, bob];

    let dh = refc::x25519(&a_secret, &b_public);
    assert_eq!(hex(&dh), i.initiator_dh_output, "{cm}");
    let (rk, ck, nhk) = refc::kdf_rk(&init.root_key.0, &dh);
    assert_eq!(hex(&rk), i.initiator_root_key, "{cm}");
    assert_eq!(hex(&ck), i.initiator_sending_chain_key, "{cm}");
    assert_eq!(hex(&nhk), i.initiator_next_sending_header_key, "{cm}");
    let mut track = [
        Track {
            kem_seed: Some(a_kem.clone()),
            kem_ek: refc::kem_keygen(&a_kem),
            kem_ct: Vec::new(),
            dh_secret: a_secret,
            rk,
            cks: Some(ck),
            hks: Some(init.header_key_initiator.0),
            nhks: nhk,
            nhkr: init.header_key_responder.0,
            ns: 0,
            pn: 0,
        },
        Track {
            kem_seed: None,
            kem_ek: Vec::new(),
            kem_ct: Vec::new(),
            dh_secret: b_secret,
            rk: init.root_key.0,
            cks: None,
            hks: None,
            nhks: init.header_key_responder.0,
            nhkr: init.header_key_initiator.0,
            ns: 0,
            pn: 0,
        },
    ];
    let mut sent: Vec<Sent> = Vec::new();
    let (mut decrypted, mut refused) = (0, 0);
    for (si, s) in case.steps.iter().enumerate() {
        let at = format!("{cm}: step {si}");
        let p = PARTIES
            .iter()
            .position(|n| *n == s.party)
            .unwrap_or_else(|| panic!("{at}: party {}", s.party));
        let t = &mut track[p];
        match s.op.as_str() {
            "encrypt" if s.error.is_some() => {
                let pt = unhex(s.plaintext.as_ref().unwrap());
                let r = parties[p].encrypt(&pt, &mut FixedRng::new(&[]));
                assert_eq!(
                    r.map_err(|e| proto_err(&e)),
                    Err(s.error.clone().unwrap()),
                    "{at}"
                );
                assert!(t.cks.is_none(), "{at}: the model could send");
            }
            "encrypt" => {
                let pt = unhex(s.plaintext.as_ref().unwrap());
                let nonce: [u8; 24] = arr(field(&s.header_nonce, "header_nonce", &at));
                let mut rng = FixedRng::new(&nonce);
                let bytes = parties[p].encrypt(&pt, &mut rng).unwrap();
                rng.assert_used_up(&at);
                assert_eq!(
                    hex(&bytes),
                    field(&s.bytes, "bytes", &at),
                    "{at}: message bytes"
                );
                // The model: chain key, message key, header, layout.
                let ck = t.cks.expect("model: sending chain");
                let hk = t.hks.expect("model: header key");
                assert_eq!(hex(&ck), field(&s.chain_key, "chain_key", &at), "{at}");
                assert_eq!(hex(&hk), field(&s.header_key, "header_key", &at), "{at}");
                let (next, mk) = refc::kdf_ck(&ck);
                assert_eq!(hex(&mk), field(&s.message_key, "message_key", &at), "{at}");
                let h = s.header.as_ref().expect("header");
                let dh_pub = public_of(&t.dh_secret);
                let ct = (!t.kem_ct.is_empty()).then(|| hex(&t.kem_ct));
                assert_eq!(
                    (h.dh.clone(), h.pn, h.n, h.ek.clone(), h.ct.clone()),
                    (hex(&dh_pub), t.pn, t.ns, hex(&t.kem_ek), ct),
                    "{at}"
                );
                let ct = (!t.kem_ct.is_empty()).then_some(&t.kem_ct[..]);
                let header = refc::header(&dh_pub, t.pn, t.ns, &t.kem_ek, ct);
                assert_eq!(
                    refc::ratchet_message(&hk, &nonce, &header, &init.ad, &mk, &pt),
                    bytes,
                    "{at}: reference message"
                );
                assert_eq!(s.message, Some(sent.len()), "{at}: message numbering");
                sent.push(Sent {
                    ek: t.kem_ek.clone(),
                    ct: t.kem_ct.clone(),
                    bytes,
                    plaintext: s.plaintext.clone().unwrap(),
                    chain_key: ck,
                    header_key: hk,
                    dh: dh_pub,
                    n: t.ns,
                });
                t.cks = Some(next);
                t.ns += 1;
            }
            "forged" => {
                // Made with the reference, not by the party: a downgraded
                // answer (header flag 0) under the right header key.
                let bytes = unhex(field(&s.bytes, "bytes", &at));
                assert_eq!(s.message, Some(sent.len()), "{at}: message numbering");
                sent.push(Sent {
                    ek: Vec::new(),
                    ct: Vec::new(),
                    bytes,
                    plaintext: s.plaintext.clone().unwrap(),
                    chain_key: [0; 32],
                    header_key: t.nhks,
                    dh: [0; 32],
                    n: 0,
                });
            }
            "encrypt_lost" => {
                let pt = unhex(s.plaintext.as_ref().unwrap());
                let nonce: [u8; 24] = arr(field(&s.header_nonce, "header_nonce", &at));
                for _ in 0..s.count.expect("count") {
                    let mut rng = FixedRng::new(&nonce);
                    parties[p].encrypt(&pt, &mut rng).unwrap();
                    rng.assert_used_up(&at);
                    t.cks = Some(refc::kdf_ck(&t.cks.expect("model: sending chain")).0);
                    t.ns += 1;
                }
            }
            "decrypt" => {
                let m = &sent[s.message.expect("message")];
                let input = s
                    .mutation
                    .as_ref()
                    .map_or(m.bytes.clone(), |x| x.apply(&m.bytes));
                let secret = s.ratchet_secret.as_deref().map(arr::<32>);
                let drawn: Vec<u8> = match (secret, &s.dh_ratchet) {
                    (Some(x), Some(d)) => {
                        [&x[..], &unhex(&d.new_kem_seed), &unhex(&d.kem_m)].concat()
                    }
                    _ => vec![0x5a; 128],
                };
                let mut rng = FixedRng::new(&drawn);
                let r = parties[p].decrypt(&input, &mut rng);
                assert_eq!(
                    Some(parties[p].skipped_len()),
                    s.skipped_keys,
                    "{at}: skipped keys"
                );
                if let Some(err) = &s.error {
                    match r {
                        Ok(_) => panic!("{at}: decrypted, expected {err}"),
                        Err(e) => assert_eq!(proto_err(&e), *err, "{at}"),
                    }
                    assert!(s.ratchet_secret.is_none() && s.dh_ratchet.is_none());
                    refused += 1;
                    continue;
                }
                let pt = r.unwrap_or_else(|e| panic!("{at}: {e}"));
                assert_eq!(hex(&pt), m.plaintext, "{at}: plaintext");
                assert_eq!(Some(hex(&pt)), s.plaintext, "{at}: stated plaintext");
                decrypted += 1;
                let Some(new_secret) = secret else {
                    assert_eq!(rng.used(), 0, "{at}: drew randomness without a DH step");
                    assert!(s.dh_ratchet.is_none());
                    continue;
                };
                rng.assert_used_up(&at);
                // The model's DH ratchet step (Signal's DHRatchetHE).
                let d = s.dh_ratchet.as_ref().expect("dh_ratchet");
                assert_eq!(d.peer_ratchet_key, hex(&m.dh), "{at}");
                assert_eq!(m.header_key, t.nhkr, "{at}: a new chain's header key");
                let dh_r = refc::x25519(&t.dh_secret, &m.dh);
                // The KEM half: the received ciphertext (none only for the
                // initiator's first chain) with our key; a new key pair; an
                // encapsulation to the sender's key.
                let received = (!m.ct.is_empty()).then(|| {
                    let seed = t
                        .kem_seed
                        .as_ref()
                        .expect("model: a key to decapsulate with");
                    refc::kem_decaps(seed, &m.ct)
                });
                assert_eq!(
                    d.received_ciphertext,
                    (!m.ct.is_empty()).then(|| hex(&m.ct)),
                    "{at}"
                );
                assert_eq!(d.received_kem_secret, received.map(|r| hex(&r)), "{at}");
                let (rk1, ckr, nhkr) = refc::kdf_rk_pq(&t.rk, &dh_r, received.as_ref());
                let new_pub = public_of(&new_secret);
                let new_seed = unhex(&d.new_kem_seed);
                let new_ek = refc::kem_keygen(&new_seed);
                assert_eq!(d.new_kem_key, hex(&new_ek), "{at}");
                let (sent_ct, sent_ss) = refc::kem_encaps(&m.ek, &arr(&d.kem_m));
                assert_eq!(d.sent_ciphertext, hex(&sent_ct), "{at}");
                assert_eq!(d.sent_kem_secret, hex(&sent_ss), "{at}");
                let dh_s = refc::x25519(&new_secret, &m.dh);
                let (rk2, cks, nhks) = refc::kdf_rk_pq(&rk1, &dh_s, Some(&sent_ss));
                let got = [
                    &d.receiving_dh_output,
                    &d.receiving_chain_key,
                    &d.next_receiving_header_key,
                    &d.root_key_between,
                    &d.new_ratchet_key,
                    &d.sending_dh_output,
                    &d.sending_chain_key,
                    &d.next_sending_header_key,
                    &d.root_key,
                ];
                let want = [dh_r, ckr, nhkr, rk1, new_pub, dh_s, cks, nhks, rk2];
                for (g, w) in got.iter().zip(want) {
                    assert_eq!(**g, hex(&w), "{at}: DH ratchet step");
                }
                // The sender's chain, seen from the receiver: n steps of KDF_CK.
                let mut ck = ckr;
                for _ in 0..m.n {
                    ck = refc::kdf_ck(&ck).0;
                }
                assert_eq!(ck, m.chain_key, "{at}: receiving chain");
                t.pn = t.ns;
                t.ns = 0;
                t.hks = Some(t.nhks);
                t.nhks = nhks;
                t.nhkr = nhkr;
                t.rk = rk2;
                t.cks = Some(cks);
                t.dh_secret = new_secret;
                t.kem_seed = Some(new_seed);
                t.kem_ek = new_ek;
                t.kem_ct = sent_ct;
            }
            op => panic!("{at}: op {op}"),
        }
    }
    (decrypted, refused)
}

#[test]
fn ratchet_vectors() {
    let cases: Vec<RatchetCase> = load("ratchet.json");
    let (mut decrypted, mut refused) = (0, 0);
    for c in &cases {
        let (d, r) = check_conversation(c);
        decrypted += d;
        refused += r;
    }
    // Case 0 continues handshake.json case 0.
    let hs: Vec<HandshakeCase> = load("handshake.json");
    assert_eq!(Some(&cases[0].init.root_key), hs[0].root_key.as_ref());
    assert_eq!(Some(&cases[0].init.ad), hs[0].transcript.as_ref());
    assert_eq!(
        cases[0].init.responder_ratchet_key,
        hs[0].inviter_ratchet_key
    );
    assert!(
        cases.len() >= 5 && decrypted >= 20 && refused >= 15,
        "{decrypted}/{refused}"
    );
}

// ---------------------------------------------------------------------------

#[test]
fn envelope_vectors() {
    let cases: Vec<EnvelopeCase> = load("envelope.json");
    let (mut ok, mut bad) = (0, 0);
    for c in &cases {
        let cm = &c.comment;
        if valid(&c.result) {
            let f = c.envelope.as_ref().expect("envelope");
            let e = f.to_envelope();
            let enc = c.encoded.as_ref().expect("encoded").bytes();
            assert_eq!(enc.len(), tern::proto::envelope::ENVELOPE_LEN, "{cm}");
            assert_eq!(e.encode().unwrap(), enc, "{cm}: encode");
            assert_eq!(Envelope::decode(&enc).unwrap(), e, "{cm}: decode");
            let unpadded = f.unpadded();
            assert_eq!(enc[..unpadded.len()], unpadded, "{cm}: layout");
            assert!(
                enc[unpadded.len()..].iter().all(|b| *b == 0),
                "{cm}: padding"
            );
            let h = field(&c.chain_hash, "chain_hash", cm);
            assert_eq!(hex(&e.chain_hash()), h, "{cm}: chain hash");
            assert_eq!(
                hex(&refc::chain_hash(&unpadded)),
                h,
                "{cm}: reference chain hash"
            );
            ok += 1;
        } else {
            let err = field(&c.error, "error", cm);
            let r = match (&c.envelope, &c.encoded) {
                (None, Some(b)) => Envelope::decode(&b.bytes()).map(|_| ()),
                (Some(f), None) => f.to_envelope().encode().map(|_| ()),
                _ => panic!("{cm}: an invalid case has exactly one input"),
            };
            assert_eq!(r.map_err(|e| proto_err(&e)), Err(err.to_string()), "{cm}");
            bad += 1;
        }
    }
    // The first three are a chain: each prev is the chain hash before it.
    let prevs: Vec<&str> = cases[..3]
        .iter()
        .map(|c| c.envelope.as_ref().unwrap().prev.as_str())
        .collect();
    assert_eq!(prevs[0], hex(&[0; 32]));
    assert_eq!(prevs[1], cases[0].chain_hash.as_deref().unwrap());
    assert_eq!(prevs[2], cases[1].chain_hash.as_deref().unwrap());
    assert!(ok >= 12 && bad >= 9, "{ok} valid, {bad} invalid");
}

fn check_receipt_case(c: &ReceiptCase) {
    use tern::proto::receipt::Receipt;
    let cm = &c.comment;
    let body = unhex(&c.body);
    if valid(&c.result) {
        let ids: Vec<[u8; 16]> = c
            .ids
            .as_ref()
            .expect("ids")
            .iter()
            .map(|i| arr(i))
            .collect();
        let r = Receipt {
            flags: c.flags.expect("flags"),
            ids: ids.clone(),
        };
        assert_eq!(r.encode().unwrap(), body, "{cm}: encode");
        assert_eq!(Receipt::decode(&body).unwrap(), r, "{cm}: decode");
        assert_eq!(
            receipt_reference::body(r.flags, &ids),
            body,
            "{cm}: reference encoding"
        );
        if let Some(f) = &c.envelope {
            let e = f.to_envelope();
            assert_eq!(e.kind.code(), 4, "{cm}");
            assert_eq!(e.body, body, "{cm}: the envelope carries the body");
            let enc = c.encoded.as_ref().expect("encoded").bytes();
            assert_eq!(e.encode().unwrap(), enc, "{cm}: envelope encode");
            assert_eq!(Envelope::decode(&enc).unwrap(), e, "{cm}: envelope decode");
        }
    } else {
        let err = field(&c.error, "error", cm);
        assert_eq!(
            Receipt::decode(&body).map_err(|e| proto_err(&e)),
            Err(err.to_string()),
            "{cm}"
        );
        assert!(receipt_reference::parse(&body).is_err(), "{cm}: reference");
    }
}

#[test]
fn receipt_vectors() {
    let cases: Vec<ReceiptCase> = load("receipt.json");
    for c in &cases {
        check_receipt_case(c);
    }
    let ok = cases.iter().filter(|c| c.result == "valid").count();
    assert!(
        ok >= 4 && cases.len() - ok >= 12,
        "{ok} valid of {}",
        cases.len()
    );
    assert!(cases.iter().any(|c| c.envelope.is_some()));
    // The check can fail: an id changed in the stated fields, or an
    // invalid body made valid, is caught.
    let mut c = cases.iter().find(|c| c.result == "valid").unwrap().clone();
    c.ids.as_mut().unwrap()[0] = hex(&[0; 16]);
    assert!(std::panic::catch_unwind(|| check_receipt_case(&c)).is_err());
    let mut c = cases
        .iter()
        .find(|c| c.result == "invalid")
        .unwrap()
        .clone();
    c.body = cases[0].body.clone();
    assert!(std::panic::catch_unwind(|| check_receipt_case(&c)).is_err());
}

#[test]
fn envelope_chain_vectors() {
    let cases: Vec<ChainCase> = load("envelope_chain.json");
    let mut steps = 0;
    for c in &cases {
        let cm = &c.comment;
        let envs: Vec<Envelope> = c
            .envelopes
            .iter()
            .map(|e| e.envelope.to_envelope())
            .collect();
        let mut last: Option<&ChainEnvelope> = None;
        for (ce, e) in c.envelopes.iter().zip(&envs) {
            assert_eq!(hex(&e.chain_hash()), ce.chain_hash, "{cm}");
            assert_eq!(
                hex(&refc::chain_hash(&ce.envelope.unpadded())),
                ce.chain_hash,
                "{cm}"
            );
            if ce.forged {
                continue;
            }
            // The sender's envelopes are numbered from 1 and linked.
            match last {
                None => assert_eq!((e.seq, e.prev), (1, [0; 32]), "{cm}"),
                Some(p) => {
                    assert_eq!(e.seq, p.envelope.seq + 1, "{cm}");
                    assert_eq!(hex(&e.prev), p.chain_hash, "{cm}");
                }
            }
            last = Some(ce);
        }
        let mut r = ChainReceiver::default();
        for s in &c.steps {
            let e = &envs[s.envelope];
            let st = r.check(e);
            if st.is_ok() {
                r.record(e);
            }
            assert_eq!(
                chain_status_name(&st),
                (s.status.clone(), s.missing),
                "{cm}: envelope {}",
                s.envelope
            );
            steps += 1;
        }
        assert_eq!(r.missing(), c.missing_after, "{cm}");
    }
    assert!(steps >= 15, "{steps}");
}

#[test]
fn queue_layer_vectors() {
    let cases: Vec<QueueCase> = load("queue_layer.json");
    let (mut ok, mut bad) = (0, 0);
    for c in &cases {
        let cm = &c.comment;
        if valid(&c.result) {
            let rm = c.ratchet_message.as_ref().expect("ratchet_message").bytes();
            let qm = c.queue_message.as_ref().expect("queue_message").bytes();
            assert_eq!(rm.len(), queue_msg::RATCHET_MSG_LEN, "{cm}");
            assert_eq!(qm.len(), tern::wire::QUEUE_MSG_LEN, "{cm}");
            let digest = field(&c.digest, "digest", cm);
            assert_eq!(hex(&queue_msg::digest(&rm)), digest, "{cm}");
            assert_eq!(hex(&refc::digest(&rm)), digest, "{cm}");
            match c.kind.as_deref() {
                Some("message") => {
                    let secret: [u8; 32] = arr(field(&c.connection_secret, "secret", cm));
                    let id: [u8; 16] = arr(field(&c.sender_id, "sender_id", cm));
                    let nonce: [u8; 24] = arr(field(&c.nonce, "nonce", cm));
                    let mut rng = FixedRng::new(&nonce);
                    let sealed = queue_msg::seal_message(&Secret32(secret), &id, &rm, &mut rng);
                    rng.assert_used_up(cm);
                    assert_eq!(sealed, qm, "{cm}: seal");
                    let QueueMessage::Message { sealed } = queue_msg::parse(&qm).unwrap() else {
                        panic!("{cm}: not a message")
                    };
                    assert_eq!(
                        queue_msg::open_message(&Secret32(secret), &id, &sealed).unwrap(),
                        rm,
                        "{cm}: open"
                    );
                    let key = refc::queue_key(&secret, &id);
                    assert_eq!(hex(&key), field(&c.queue_key, "queue_key", cm), "{cm}");
                    assert_eq!(refc::queue_seal(&key, &nonce, &rm, qm.len()), qm, "{cm}");
                }
                Some("conn_request") => {
                    let j: [u8; 32] = arr(field(&c.joiner_identity, "joiner_identity", cm));
                    let e: [u8; 32] = arr(field(&c.joiner_ephemeral, "joiner_ephemeral", cm));
                    assert_eq!(queue_msg::conn_request(&j, &e, &rm), qm, "{cm}: build");
                    assert_eq!(
                        queue_msg::parse(&qm).unwrap(),
                        QueueMessage::ConnRequest {
                            joiner_identity: j,
                            joiner_ephemeral: e,
                            ratchet_msg: rm.clone()
                        },
                        "{cm}: parse"
                    );
                    let mut layout = vec![0x01];
                    layout.extend_from_slice(&j);
                    layout.extend_from_slice(&e);
                    layout.extend_from_slice(&rm);
                    layout.resize(qm.len(), 0);
                    assert_eq!(layout, qm, "{cm}: layout");
                }
                k => panic!("{cm}: kind {k:?}"),
            }
            ok += 1;
        } else {
            let base = &cases[c.of_case.expect("of_case")];
            let qm = base.queue_message.as_ref().unwrap().bytes();
            let input = c.mutation.as_ref().map_or(qm.clone(), |m| m.apply(&qm));
            let secret = c
                .connection_secret
                .as_ref()
                .or(base.connection_secret.as_ref());
            let id = c.sender_id.as_ref().or(base.sender_id.as_ref());
            let r = queue_msg::parse(&input).and_then(|p| match p {
                QueueMessage::Message { sealed } => queue_msg::open_message(
                    &Secret32(arr(secret.expect("secret"))),
                    &arr(id.expect("sender_id")),
                    &sealed,
                )
                .map(|_| ()),
                QueueMessage::ConnRequest { .. } => Ok(()),
                QueueMessage::Resync { kind, sealed } => queue_msg::open_sealed(
                    &Secret32(arr(secret.expect("secret"))),
                    &arr(id.expect("sender_id")),
                    kind,
                    &sealed,
                )
                .map(|_| ()),
            });
            assert_eq!(
                r.map_err(|e| proto_err(&e)),
                Err(field(&c.error, "error", cm).to_string()),
                "{cm}"
            );
            bad += 1;
        }
    }
    assert!(ok >= 3 && bad >= 10, "{ok} valid, {bad} invalid");
}

#[test]
fn delivery_vectors() {
    let cases: Vec<DeliveryCase> = load("delivery.json");
    let (mut ok, mut bad) = (0, 0);
    let static_secret = |s: &str| x25519_dalek::StaticSecret::from(arr::<32>(s));
    for c in &cases {
        let cm = &c.comment;
        if valid(&c.result) {
            let rs = field(&c.relay_secret, "relay_secret", cm);
            let cs = field(&c.recipient_secret, "recipient_secret", cm);
            let rp: [u8; 32] = arr(field(&c.relay_public, "relay_public", cm));
            let cp: [u8; 32] = arr(field(&c.recipient_public, "recipient_public", cm));
            assert_eq!(public_of(&arr(rs)), rp);
            assert_eq!(public_of(&arr(cs)), cp);
            let qs = *delivery::queue_secret(&static_secret(rs), &cp).unwrap();
            assert_eq!(
                *delivery::queue_secret(&static_secret(cs), &rp).unwrap(),
                qs,
                "{cm}"
            );
            assert_eq!(hex(&qs), field(&c.queue_secret, "queue_secret", cm), "{cm}");
            assert_eq!(refc::x25519(&arr(rs), &cp), qs, "{cm}");
            let id: [u8; 16] = arr(field(&c.msg_id, "msg_id", cm));
            let msg = c.message.as_ref().expect("message").bytes();
            let ct = unhex(field(&c.ciphertext, "ciphertext", cm));
            assert_eq!(delivery::delivery_seal(&qs, &id, &msg), ct, "{cm}: seal");
            assert_eq!(
                delivery::delivery_open(&qs, &id, &ct).unwrap(),
                msg,
                "{cm}: open"
            );
            let (key, nonce) = refc::delivery_cipher(&qs, &id);
            assert_eq!(hex(&key), field(&c.key, "key", cm), "{cm}");
            assert_eq!(hex(&nonce), field(&c.nonce, "nonce", cm), "{cm}");
            assert_eq!(refc::chacha_seal(&key, &nonce, &id, &msg), ct, "{cm}");
            ok += 1;
        } else {
            let err = field(&c.error, "error", cm);
            let r = match c.of_case {
                Some(of) => {
                    let base = &cases[of];
                    let ct = unhex(base.ciphertext.as_ref().unwrap());
                    let input = c.mutation.as_ref().map_or(ct.clone(), |m| m.apply(&ct));
                    let qs = c.queue_secret.as_ref().or(base.queue_secret.as_ref());
                    let id = c.msg_id.as_ref().or(base.msg_id.as_ref());
                    delivery::delivery_open(&arr(qs.unwrap()), &arr(id.unwrap()), &input)
                        .map(|_| ())
                }
                None => delivery::queue_secret(
                    &static_secret(field(&c.relay_secret, "relay_secret", cm)),
                    &arr(field(&c.recipient_public, "recipient_public", cm)),
                )
                .map(|_| ()),
            };
            assert_eq!(
                r.map_err(|e| delivery_err(&e)),
                Err(err.to_string()),
                "{cm}"
            );
            bad += 1;
        }
    }
    assert!(ok >= 3 && bad >= 8, "{ok} valid, {bad} invalid");
}

#[test]
fn hello_vectors() {
    let cases: Vec<HelloCase> = load("hello.json");
    let (mut ok, mut bad) = (0, 0);
    for c in &cases {
        let cm = &c.comment;
        let b = unhex(&c.encoded);
        if !valid(&c.result) {
            let err = field(&c.error, "error", cm);
            let r = match c.kind.as_str() {
                "hello" => Hello::decode(&b).map(|_| ()),
                "hello_reply" => HelloReply::decode(&b).map(|_| ()),
                k => panic!("{cm}: kind {k}"),
            };
            assert_eq!(r.map_err(|e| proto_err(&e)), Err(err.to_string()), "{cm}");
            bad += 1;
            continue;
        }
        let channel = match c.channel.as_deref() {
            Some("screen") => Channel::Screen,
            Some("shared") => Channel::Shared,
            ch => panic!("{cm}: channel {ch:?}"),
        };
        assert_eq!(channel_name(channel), c.channel.as_deref().unwrap());
        let keys: Vec<[u8; 32]> = c.sender_keys.iter().map(|k| arr(k)).collect();
        let profile = profile_of(c.profile.as_ref().expect("profile"));
        profile.validate().unwrap();
        let (min_version, max_version) = (c.min_version.unwrap(), c.max_version.unwrap());
        if c.kind == "hello" {
            let h = Hello {
                min_version,
                max_version,
                channel,
                sender_keys: keys,
                reply_queues: c.reply_queues.iter().map(QueueFields::to_queue).collect(),
                profile,
            };
            assert_eq!(h.encode(), b, "{cm}: encode");
            assert_eq!(Hello::decode(&b).unwrap(), h, "{cm}: decode");
        } else {
            assert!(c.reply_queues.is_empty());
            let h = HelloReply {
                min_version,
                max_version,
                channel,
                sender_keys: keys,
                profile,
            };
            assert_eq!(h.encode(), b, "{cm}: encode");
            assert_eq!(HelloReply::decode(&b).unwrap(), h, "{cm}: decode");
        }
        ok += 1;
    }
    assert!(ok >= 3 && bad >= 15, "{ok} valid, {bad} invalid");
}

/// One case of device.json, checked from its stored values alone.
fn check_device_case(c: &DeviceCase) {
    let cm = &c.comment;
    match (c.kind.as_str(), valid(&c.result)) {
        ("fingerprint", true) => {
            let th: [u8; 32] = arr(field(&c.transcript, "transcript", cm));
            let fp = field(&c.fingerprint, "fingerprint", cm);
            assert_eq!(hex(&device::fingerprint(&th)), fp, "{cm}");
            let reference = refc::sha256(&[b"tern/v1 device fingerprint", &th]);
            assert_eq!(hex(&reference), fp, "{cm}: reference");
        }
        ("message", true) => {
            let fields = c.message.as_ref().expect("message");
            let body = unhex(field(&c.body, "body", cm));
            let msg = fields.to_msg();
            assert_eq!(hex(&msg.encode()), hex(&body), "{cm}: encode");
            assert_eq!(
                hex(&device_ref::body(fields)),
                hex(&body),
                "{cm}: reference"
            );
            let back = DeviceMsg::decode(&body).unwrap_or_else(|e| panic!("{cm}: {e}"));
            assert_eq!(back, msg, "{cm}: decode");
            assert_eq!(&DeviceMsgFields::of(&back), fields, "{cm}: decoded fields");
            assert_eq!(body[0], device_ref::type_byte(&fields.msg_type), "{cm}");
            assert_eq!(
                back.from_contact_allowed(),
                matches!(fields.msg_type.as_str(), "ADD" | "DROP" | "ADDED"),
                "{cm}: only ADD, DROP and ADDED may come from a contact"
            );
        }
        ("message", false) => {
            let err = field(&c.error, "error", cm);
            assert!(c.message.is_none(), "{cm}: an invalid case has only a body");
            match DeviceMsg::decode(&unhex(field(&c.body, "body", cm))) {
                Ok(m) => panic!("{cm}: decoded as {m:?}"),
                Err(e) => assert_eq!(proto_err(&e), err, "{cm}"),
            }
        }
        ("device_link", true) => {
            let fields = c.invitation.as_ref().expect("invitation");
            let inv = fields.to_invitation();
            let bin = unhex(field(&c.binary, "binary", cm));
            let link = field(&c.link, "link", cm);
            let refused = field(&c.contact_invitation_error, "contact_invitation_error", cm);
            assert_eq!(bin[1], 3, "{cm}: kind 3");
            assert_eq!(device_ref::invitation(fields, 3), bin, "{cm}: reference");
            assert_eq!(inv.to_device_link(), link, "{cm}: link");
            assert_eq!(
                link,
                &link_ref::link(&bin),
                "{cm}: the link is TERN:, the base32 of the binary form and its checksum"
            );
            assert!(link_ref::verifies(link), "{cm}: the reference checksum");
            let mut as_contact = inv.encode();
            as_contact[1] = 3;
            assert_eq!(as_contact, bin, "{cm}: a contact invitation's body");
            assert_eq!(
                parse_link(link).unwrap(),
                AnyInvitation::Device(inv.clone()),
                "{cm}: parse_link"
            );
            assert_eq!(
                parse_link(&inv.to_link()).unwrap(),
                AnyInvitation::Contact(inv.clone()),
                "{cm}: the same invitation as kind 1"
            );
            for got in [Invitation::from_link(link), Invitation::decode(&bin)] {
                match got {
                    Ok(i) => panic!("{cm}: read as a contact invitation {i:?}"),
                    Err(e) => assert_eq!(proto_err(&e), refused, "{cm}"),
                }
            }
        }
        (k, v) => panic!("{cm}: kind {k}, valid {v}"),
    }
}

#[test]
fn device_vectors() {
    let cases: Vec<DeviceCase> = load("device.json");
    let mut seen = std::collections::BTreeMap::<(String, bool), usize>::new();
    let mut types = BTreeSet::new();
    for c in &cases {
        check_device_case(c);
        *seen.entry((c.kind.clone(), valid(&c.result))).or_default() += 1;
        if let Some(m) = &c.message {
            types.insert(m.msg_type.clone());
        }
    }
    let n = |k: &str, v: bool| seen.get(&(k.to_string(), v)).copied().unwrap_or(0);
    assert!(n("fingerprint", true) >= 3, "{seen:?}");
    assert!(
        n("message", true) >= 10 && n("message", false) >= 15,
        "{seen:?}"
    );
    assert!(n("device_link", true) >= 1, "{seen:?}");
    assert_eq!(
        types.len(),
        13,
        "one valid body of every message type: {types:?}"
    );
}

/// The vectors must not pass against anything: a changed byte in a stored
/// ratchet message or sealed block is caught by the per-case checks.
#[test]
fn checks_can_fail() {
    let cases: Vec<RatchetCase> = load("ratchet.json");
    let mut c = cases[0].clone();
    let step = c
        .steps
        .iter_mut()
        .find(|s| s.op == "encrypt" && s.error.is_none())
        .unwrap();
    let mut b = unhex(step.bytes.as_ref().unwrap());
    b[50] ^= 1;
    step.bytes = Some(hex(&b));
    assert!(std::panic::catch_unwind(|| check_conversation(&c)).is_err());

    let mut c = cases[1].clone();
    let step = c.steps.iter_mut().find(|s| s.dh_ratchet.is_some()).unwrap();
    step.dh_ratchet.as_mut().unwrap().root_key = hex(&[0; 32]);
    assert!(std::panic::catch_unwind(|| check_conversation(&c)).is_err());

    // A command that re-encodes differently is caught too.
    let cmds: Vec<CommandCase> = load("relay_commands.json");
    let c = cmds
        .iter()
        .find(|c| c.command.as_ref().is_some_and(|f| f.name == "SUB"))
        .unwrap();
    let mut f = c.command.clone().unwrap();
    *f.window.as_mut().unwrap() += 1;
    let key = SigningKey::from_bytes(&arr(c.signing_key.as_ref().unwrap()));
    let hash: [u8; 32] = arr(c.session_hash.as_ref().unwrap());
    assert!(matches!(f.to_command(), Command::Subscribe { .. }));
    assert_ne!(
        command_record(f.tag, &f.to_command(), &hash, Some(&key)),
        c.record.bytes()
    );

    // A session whose message 1, message 2, handshake hash, trace or a
    // transport message has one changed byte is caught.
    let sessions: Vec<SessionCase> = load("session.json");
    let flip = |h: &mut Option<String>, at: usize| {
        let mut b = unhex(h.as_ref().unwrap());
        b[at] ^= 1;
        *h = Some(hex(&b));
    };
    let mut c = sessions[0].clone();
    flip(&mut c.message1, 40);
    assert!(std::panic::catch_unwind(|| check_session(&c)).is_err());
    let mut c = sessions[0].clone();
    flip(&mut c.message2, 1100);
    assert!(std::panic::catch_unwind(|| check_session(&c)).is_err());
    let mut c = sessions[1].clone();
    flip(&mut c.handshake_hash, 0);
    assert!(std::panic::catch_unwind(|| check_session(&c)).is_err());
    let mut c = sessions[0].clone();
    c.symmetric_state[5].ck = hex(&[0; 32]);
    assert!(std::panic::catch_unwind(|| check_session(&c)).is_err());
    let mut c = sessions[0].clone();
    let mut m = unhex(&c.transport[4].message);
    m[100] ^= 1;
    c.transport[4].message = hex(&m);
    assert!(std::panic::catch_unwind(|| check_session(&c)).is_err());

    // A device message whose fields no longer match its body, and a body
    // that decodes after all, are caught too.
    let cases: Vec<DeviceCase> = load("device.json");
    let mut c = cases
        .iter()
        .find(|c| c.message.as_ref().is_some_and(|m| m.msg_type == "SETTINGS"))
        .unwrap()
        .clone();
    *c.message.as_mut().unwrap().rotate_days.as_mut().unwrap() += 1;
    assert!(std::panic::catch_unwind(|| check_device_case(&c)).is_err());
    let mut c = cases
        .iter()
        .find(|c| c.result == "invalid")
        .unwrap()
        .clone();
    c.body = Some(hex(&[device::DROP; 33]));
    assert!(std::panic::catch_unwind(|| check_device_case(&c)).is_err());
}

#[test]
fn resync_vectors() {
    use tern::proto::handshake::{resync_accepter_agree, resync_offerer_agree};
    let cases: Vec<ResyncCase> = load("resync.json");
    assert!(!cases.is_empty());
    for c in &cases {
        let cm = &c.comment;
        let th: [u8; 32] = arr(&c.transcript);
        let cs = Secret32(arr(&c.connection_secret));
        let sid: [u8; 16] = arr(&c.sender_id);
        // The offer: keys drawn I' then R', the body, the queue message.
        let mut rng = FixedRng::new(&unhex(&c.offer_secrets));
        let offer = InviterSecrets::generate(&mut rng);
        rng.assert_used_up(cm);
        let (ip, rp) = (offer.invitation.public(), offer.ratchet.public());
        assert_eq!(hex(&ip), c.offer_invitation_key, "{cm}");
        assert_eq!(hex(&rp), c.offer_ratchet_key, "{cm}");
        let offer_kem = tern::proto::keys::KemSeed(arr(&c.offer_kem_seed));
        let ek = offer_kem.encapsulation_key();
        assert_eq!(hex(&ek), c.offer_kem_key, "{cm}");
        assert_eq!(ek, refc::kem_keygen(&offer_kem.0), "{cm}");
        let mut body = ip.to_vec();
        body.extend(rp);
        body.extend(&ek);
        body.extend(c.offer_head_seq.to_be_bytes());
        body.extend(unhex(&c.offer_head_hash));
        assert_eq!(hex(&body), c.offer_body, "{cm}: offer body");
        let mut rng = FixedRng::new(&unhex(&c.offer_nonce));
        let om =
            queue_msg::seal_payload(&cs, &sid, &queue_msg::resync_payload(0x03, &body), &mut rng)
                .unwrap();
        rng.assert_used_up(cm);
        assert_eq!(om, c.offer_message.bytes(), "{cm}: offer message");
        let QueueMessage::Resync { kind: 0x03, sealed } = queue_msg::parse(&om).unwrap() else {
            panic!("{cm}: not an offer")
        };
        assert_eq!(
            queue_msg::open_sealed(&cs, &sid, 0x03, &sealed).unwrap(),
            body
        );
        // The accept side's key schedule, checked by the reference too.
        let mut rng = FixedRng::new(&unhex(&c.accept_secrets));
        let (init, jp, ep) = resync_accepter_agree(&th, &cs, &ip, &rp, &mut rng).unwrap();
        rng.assert_used_up(cm);
        assert_eq!(hex(&jp), c.accept_identity_key, "{cm}");
        assert_eq!(hex(&ep), c.accept_ephemeral_key, "{cm}");
        let secrets = unhex(&c.accept_secrets);
        let (js, es): ([u8; 32], [u8; 32]) = (
            secrets[..32].try_into().unwrap(),
            secrets[32..].try_into().unwrap(),
        );
        let dh = [
            refc::x25519(&js, &rp),
            refc::x25519(&es, &ip),
            refc::x25519(&es, &rp),
        ];
        for (d, v) in dh.iter().zip([&c.dh1, &c.dh2, &c.dh3]) {
            assert_eq!(hex(d), *v, "{cm}");
        }
        let salt = refc::sha256(&[b"tern/v1 resync transcript", &th, &ip, &rp, &jp, &ep]);
        assert_eq!(hex(&salt), c.resync_transcript, "{cm}");
        let k = refc::resync_keys(&salt, dh, &cs.0);
        assert_eq!(hex(&k[0]), c.root_key, "{cm}");
        assert_eq!(hex(&k[1]), c.header_key_initiator, "{cm}");
        assert_eq!(hex(&k[2]), c.header_key_responder, "{cm}");
        assert_eq!(hex(init.root_key.as_bytes()), c.root_key, "{cm}");
        assert_eq!(init.ad, th, "{cm}: ad is the connection's transcript");
        // The first ratchet message, RESYNCED.
        let env = c.resynced.to_envelope();
        assert_eq!(
            env.body,
            resynced_body(c.resynced_head_seq, &arr(&c.resynced_head_hash))
        );
        let drawn = [
            unhex(&c.initiator_ratchet_secret),
            unhex(&c.initiator_kem_seed),
            unhex(&c.initiator_kem_m),
        ]
        .concat();
        let mut rng = FixedRng::new(&drawn);
        let mut ratchet = Ratchet::init_initiator_pq(&init, &rp, Some(&ek), &mut rng).unwrap();
        rng.assert_used_up(cm);
        // The first chain is hybrid: an encapsulation to EK'.
        let (ct, ss) = refc::kem_encaps(&ek, &arr(&c.initiator_kem_m));
        assert_eq!(hex(&ct), c.offer_ciphertext, "{cm}");
        assert_eq!(hex(&ss), c.offer_kem_secret, "{cm}");
        assert_eq!(offer_kem.decapsulate(&ct).unwrap().0, ss, "{cm}");
        let x: [u8; 32] = arr(&c.initiator_ratchet_secret);
        let (_, ck, _) = refc::kdf_rk_pq(&k[0], &refc::x25519(&x, &rp), Some(&ss));
        assert_eq!(hex(&ck), c.first_chain_key, "{cm}");
        assert_eq!(
            hex(&refc::kem_keygen(&unhex(&c.initiator_kem_seed))),
            c.initiator_kem_key
        );
        let mut rng = FixedRng::new(&unhex(&c.header_nonce));
        let rm = ratchet.encrypt(&env.encode().unwrap(), &mut rng).unwrap();
        rng.assert_used_up(cm);
        assert_eq!(hex(&rm), c.ratchet_message, "{cm}: ratchet message");
        let mut body = jp.to_vec();
        body.extend(ep);
        body.extend(&rm);
        let mut rng = FixedRng::new(&unhex(&c.accept_nonce));
        let am =
            queue_msg::seal_payload(&cs, &sid, &queue_msg::resync_payload(0x04, &body), &mut rng)
                .unwrap();
        rng.assert_used_up(cm);
        assert_eq!(am, c.accept_message.bytes(), "{cm}: accept message");
        // The offering side opens it.
        let QueueMessage::Resync { kind: 0x04, sealed } = queue_msg::parse(&am).unwrap() else {
            panic!("{cm}: not an accept")
        };
        let opened = queue_msg::open_sealed(&cs, &sid, 0x04, &sealed).unwrap();
        assert_eq!(opened, body);
        let oinit = resync_offerer_agree(&offer, &th, &cs, &jp, &ep).unwrap();
        let mut responder =
            Ratchet::init_responder_pq(&oinit, offer.ratchet.clone(), Some(offer_kem.clone()));
        let pt = responder
            .decrypt(&rm, &mut FixedRng::new(&[7; 128]))
            .unwrap();
        assert_eq!(Envelope::decode(&pt).unwrap(), env, "{cm}");
    }
}

#[test]
fn file_vectors() {
    use tern::proto::file::{open_chunk, queue_auth, seal_chunk, set_key, FileOffer};
    let cases: Vec<FileCase> = load("file.json");
    let (mut ok, mut bad) = (0, 0);
    for c in &cases {
        let cm = &c.comment;
        let base = c.of_case.map(|i| &cases[i]);
        match (c.kind.as_str(), valid(&c.result)) {
            ("offer", true) => {
                let encoded = unhex(field(&c.encoded, "encoded", cm));
                let offer = offer_of(c);
                assert_eq!(offer.encode().unwrap(), encoded, "{cm}: encode");
                assert_eq!(FileOffer::decode(&encoded).unwrap(), offer, "{cm}: decode");
                assert_eq!(refc::file_offer(c), encoded, "{cm}: reference");
                ok += 1;
            }
            ("offer", false) => {
                let b = base.expect("of_case");
                let input = unhex(b.encoded.as_ref().unwrap());
                let input = c
                    .mutation
                    .as_ref()
                    .map_or(input.clone(), |m| m.apply(&input));
                assert_eq!(
                    FileOffer::decode(&input)
                        .map(|_| ())
                        .map_err(|e| proto_err(&e)),
                    Err(field(&c.error, "error", cm).to_string()),
                    "{cm}"
                );
                bad += 1;
            }
            ("chunk", true) => {
                let key = Secret32(arr(field(&c.file_key, "file_key", cm)));
                let set = c.set.expect("set");
                let sk = set_key(&key, set);
                assert_eq!(hex(&sk[..]), field(&c.set_key, "set_key", cm), "{cm}");
                assert_eq!(refc::file_set_key(&key.0, set), *sk, "{cm}");
                let size = c.size.expect("size");
                let index = c.index.expect("index");
                let data = unhex(field(&c.data, "data", cm));
                let msg = unhex(field(&c.encoded, "encoded", cm));
                let count = refc::file_chunk_count(size);
                assert_eq!(seal_chunk(&sk, index, count, &data), msg, "{cm}: seal");
                let (nonce, reference) = refc::file_chunk(&sk[..], index, count, &data);
                assert_eq!(reference, msg, "{cm}: reference");
                assert_eq!(hex(&nonce), field(&c.nonce, "nonce", cm), "{cm}");
                let mut m = msg.clone();
                let (i, d) = open_chunk(&sk, size, &mut m).unwrap();
                assert_eq!((i, d), (index, &data[..]), "{cm}: open");
                ok += 1;
            }
            ("chunk", false) => {
                let (mut input, key, set, size) = match base {
                    Some(b) => {
                        let m = unhex(b.encoded.as_ref().unwrap());
                        (
                            c.mutation.as_ref().map_or(m.clone(), |x| x.apply(&m)),
                            b.file_key.clone().unwrap(),
                            c.set.or(b.set).unwrap(),
                            c.size.or(b.size).unwrap(),
                        )
                    }
                    None => (
                        unhex(field(&c.encoded, "encoded", cm)),
                        c.file_key.clone().unwrap(),
                        c.set.unwrap(),
                        c.size.unwrap(),
                    ),
                };
                let sk = set_key(&Secret32(arr(&key)), set);
                assert_eq!(
                    open_chunk(&sk, size, &mut input)
                        .map(|_| ())
                        .map_err(|e| chunk_err(&e)),
                    Err(field(&c.error, "error", cm).to_string()),
                    "{cm}"
                );
                bad += 1;
            }
            ("queue_auth", true) => {
                let seed: [u8; 32] = arr(field(&c.set_seed, "set_seed", cm));
                let q = c.queue.expect("queue");
                let k = queue_auth(&Secret32(seed), q);
                assert_eq!(
                    hex(&k.to_bytes()),
                    field(&c.auth_seed, "auth_seed", cm),
                    "{cm}"
                );
                assert_eq!(
                    hex(&k.verifying_key().to_bytes()),
                    field(&c.auth_public, "auth_public", cm),
                    "{cm}"
                );
                let info = [b"tern/v1 file queue auth".as_slice(), &q.to_be_bytes()].concat();
                assert_eq!(hex(&refc::hkdf(None, &seed, &info, 32)), hex(&k.to_bytes()));
                ok += 1;
            }
            (k, _) => panic!("{cm}: unknown kind {k}"),
        }
    }
    assert!(ok >= 10 && bad >= 10, "{ok} valid, {bad} invalid");
}
