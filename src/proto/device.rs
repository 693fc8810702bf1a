//! Device messages (PROTOCOL.md §12): the bodies of envelopes of kind 8,
//! through which the devices of one person share a profile.
//!
//! Each device has connections of its own — one to every contact and one to
//! every other device of the same person — so no ratchet state is ever
//! shared. Two families of messages ride inside those connections:
//!
//! * to a **contact**: `ADD` (here is an invitation made by another device of
//!   mine: connect to it too) and `DROP` (forget my device with this
//!   fingerprint). They arrive inside an authenticated connection, which is
//!   why a contact can act on them without asking anyone: a relay cannot
//!   forge them, and nothing else could introduce a device.
//! * between **devices** of one person: the profile, the contacts and the
//!   history for a new device, its invitations for those contacts, copies of
//!   the messages each device sends or receives, and what each device must
//!   know to cut another off.
//!
//! Binary form: `u8 type` then the fields below; every message must be read
//! to its end. Strings are UTF-8; `s8` is `u8 length + bytes`, `s32` is
//! `u32 length + bytes` (big-endian, as everywhere).

use sha2::{Digest, Sha256};
use tern_wire::address::RelayAddress;
use tern_wire::codec::{CodecError, Reader, Writer};
use tern_wire::Id;

use super::keys::Secret32;
use super::ProtoError;

pub const ADD: u8 = 0x01;
pub const DROP: u8 = 0x02;
pub const ADDED: u8 = 0x03;
pub const SETTINGS: u8 = 0x10;
pub const GROUP: u8 = 0x11;
pub const SIBLING: u8 = 0x12;
pub const OFFER: u8 = 0x13;
pub const HISTORY: u8 = 0x14;
pub const COPY: u8 = 0x15;
pub const ANNOUNCE: u8 = 0x16;
pub const REMOVED: u8 = 0x17;
pub const PROFILE: u8 = 0x18;
pub const FORGET: u8 = 0x19;

const FINGERPRINT_LABEL: &[u8] = b"tern/v1 device fingerprint";
const ADDED_LABEL: &[u8] = b"tern/v1 device added";
/// Most relays a profile may list (and an announcement may name).
pub const MAX_RELAYS: usize = 32;
/// Most queues one announcement names: current, new and retired ones.
pub const MAX_ANNOUNCED_QUEUES: usize = 12;
/// Most connections one GROUP message names.
pub const MAX_MEMBERS: usize = 255;
/// Most fingerprints one REMOVED message lists.
pub const MAX_REMOVED: usize = 255;

/// Names a connection to everyone who knows its transcript (both of its ends)
/// and to nobody else: `SHA-256("tern/v1 device fingerprint" || transcript)`.
pub fn fingerprint(transcript: &[u8; 32]) -> [u8; 32] {
    Sha256::new()
        .chain_update(FINGERPRINT_LABEL)
        .chain_update(transcript)
        .finalize()
        .into()
}

/// Names an ADD's invitation in the ADDED that answers it:
/// `SHA-256("tern/v1 device added" || invitation)`.
pub fn added_tag(invitation: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(ADDED_LABEL)
        .chain_update(invitation)
        .finalize()
        .into()
}

/// One history entry as devices exchange it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The message came from the contact (as opposed to from us).
    pub incoming: bool,
    pub id: [u8; 16],
    pub sent_at_ms: u64,
    /// When the device that stored it received it (0: not known).
    pub received_at_ms: u64,
    pub text: String,
}

impl Entry {
    fn encode(&self, w: &mut Writer) {
        w.u8(if self.incoming { 1 } else { 2 })
            .bytes(&self.id)
            .u64(self.sent_at_ms)
            .u64(self.received_at_ms)
            .long_bytes(self.text.as_bytes());
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        let incoming = match r.u8()? {
            1 => true,
            2 => false,
            _ => return Err(CodecError::Invalid("history entry direction").into()),
        };
        Ok(Self {
            incoming,
            id: r.array()?,
            sent_at_ms: r.u64()?,
            received_at_ms: r.u64()?,
            text: utf8(r.long_bytes()?)?,
        })
    }

    /// Bytes this entry takes in a HISTORY message.
    pub fn encoded_len(&self) -> usize {
        1 + 16 + 8 + 8 + 4 + self.text.len()
    }
}

/// A receiving queue another device may delete once this one is removed.
#[derive(Clone, PartialEq, Eq)]
pub struct QueueGrant {
    /// The relay, with the access key if the owner has one.
    pub relay: RelayAddress,
    pub recipient_id: Id,
    /// Signs DELETE (and could FETCH, so only devices of the same person get it).
    pub auth: Secret32,
}

impl std::fmt::Debug for QueueGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueueGrant(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceMsg {
    /// To a contact or a device: connect to the device that made this
    /// invitation (kind 1, binary form). `name` is that device's name when
    /// sent to another device of the person, empty when sent to a contact;
    /// `introduce` asks a contact to introduce its own other devices to the
    /// new one.
    Add {
        name: String,
        introduce: bool,
        invitation: Vec<u8>,
    },
    /// To a contact or a device: forget the connection with this fingerprint.
    Drop { fingerprint: [u8; 32] },
    /// From a contact, on the connection an ADD came on: accepted (`tag` is
    /// [`added_tag`] of its invitation). Everything the contact sent on this
    /// connection before it went to this connection only; everything after
    /// also to the new device. `fingerprint` names the connection the
    /// contact made from it, so that the person's devices can have it
    /// dropped with that device, whatever the device itself announces.
    Added {
        tag: [u8; 32],
        fingerprint: [u8; 32],
    },
    /// To a new device: the profile (PROTOCOL.md §5.5 form), the relays with
    /// their access keys, and the rotation period in days.
    Settings {
        profile: Vec<u8>,
        relays: Vec<RelayAddress>,
        rotate_days: u32,
    },
    /// To another device of ours: a contact to connect to, one invitation
    /// per connection in `members` (the sender's connections with each of
    /// the contact's devices, by the sender's ids). `introduce` is copied
    /// into the OFFERs and ADDs that follow (see PROTOCOL.md §12.4). No
    /// security code and no "verified": those never come from another
    /// device's word (§12.7).
    Group {
        group: [u8; 16],
        name: String,
        introduce: bool,
        members: Vec<[u8; 16]>,
    },
    /// To a new device: another device of the person to connect to.
    Sibling { device: [u8; 16], name: String },
    /// An invitation for the receiver to forward, as ADD, through its
    /// connection `via` (an id it gave in GROUP or SIBLING).
    Offer {
        via: [u8; 16],
        introduce: bool,
        invitation: Vec<u8>,
    },
    /// To a new device: part of the history with a contact, oldest first.
    History {
        group: [u8; 16],
        entries: Vec<Entry>,
    },
    /// A message one device sent or received, for the others' history.
    Copy { group: [u8; 16], entry: Entry },
    /// The sender's connection with `fingerprint` (to the contact of `group`,
    /// or to another device when `group` is `None`) and its receiving queues.
    Announce {
        group: Option<[u8; 16]>,
        fingerprint: [u8; 32],
        queues: Vec<QueueGrant>,
    },
    /// A device was removed: forget the connections with these fingerprints.
    /// Naming the connection it came on, it tells the receiver that it is
    /// the device removed.
    Removed { fingerprints: Vec<[u8; 32]> },
    /// After linking: the user changed the profile on the sending device
    /// (PROTOCOL.md §5.5 form). Relays and preferences stay per device.
    Profile { profile: Vec<u8> },
    /// The user forgot the contact of `group` on the sending device.
    Forget { group: [u8; 16] },
}

impl DeviceMsg {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match self {
            DeviceMsg::Add {
                name,
                introduce,
                invitation,
            } => {
                w.u8(ADD)
                    .short_bytes(clip(name, 64).as_bytes())
                    .u8(u8::from(*introduce))
                    .long_bytes(invitation);
            }
            DeviceMsg::Drop { fingerprint } => {
                w.u8(DROP).bytes(fingerprint);
            }
            DeviceMsg::Added { tag, fingerprint } => {
                w.u8(ADDED).bytes(tag).bytes(fingerprint);
            }
            DeviceMsg::Settings {
                profile,
                relays,
                rotate_days,
            } => {
                w.u8(SETTINGS).long_bytes(profile);
                let relays = &relays[..relays.len().min(MAX_RELAYS)];
                w.u8(relays.len() as u8);
                // The binary form (§3.1.2), access key included: the text
                // form of a long address would not fit a short string.
                for r in relays {
                    r.encode(&mut w);
                }
                w.u32(*rotate_days);
            }
            DeviceMsg::Group {
                group,
                name,
                introduce,
                members,
            } => {
                let members = &members[..members.len().min(MAX_MEMBERS)];
                w.u8(GROUP)
                    .bytes(group)
                    .short_bytes(clip(name, 64).as_bytes())
                    .u8(u8::from(*introduce))
                    .u8(members.len() as u8);
                for m in members {
                    w.bytes(m);
                }
            }
            DeviceMsg::Sibling { device, name } => {
                w.u8(SIBLING)
                    .bytes(device)
                    .short_bytes(clip(name, 64).as_bytes());
            }
            DeviceMsg::Offer {
                via,
                introduce,
                invitation,
            } => {
                w.u8(OFFER)
                    .bytes(via)
                    .u8(u8::from(*introduce))
                    .long_bytes(invitation);
            }
            DeviceMsg::History { group, entries } => {
                let n = u16::try_from(entries.len()).expect("callers split histories");
                w.u8(HISTORY).bytes(group).u16(n);
                for e in entries {
                    e.encode(&mut w);
                }
            }
            DeviceMsg::Copy { group, entry } => {
                w.u8(COPY).bytes(group);
                entry.encode(&mut w);
            }
            DeviceMsg::Announce {
                group,
                fingerprint,
                queues,
            } => {
                w.u8(ANNOUNCE);
                match group {
                    Some(g) => w.u8(1).bytes(g),
                    None => w.u8(0),
                };
                w.bytes(fingerprint);
                let queues = &queues[..queues.len().min(MAX_ANNOUNCED_QUEUES)];
                w.u8(queues.len() as u8);
                for q in queues {
                    q.relay.encode(&mut w);
                    w.bytes(&q.recipient_id).bytes(q.auth.as_bytes());
                }
            }
            DeviceMsg::Removed { fingerprints } => {
                let fps = &fingerprints[..fingerprints.len().min(MAX_REMOVED)];
                w.u8(REMOVED).u8(fps.len() as u8);
                for f in fps {
                    w.bytes(f);
                }
            }
            DeviceMsg::Profile { profile } => {
                w.u8(PROFILE).long_bytes(profile);
            }
            DeviceMsg::Forget { group } => {
                w.u8(FORGET).bytes(group);
            }
        }
        w.into_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(bytes);
        let msg = match r.u8()? {
            ADD => DeviceMsg::Add {
                name: utf8(r.short_bytes()?)?,
                introduce: flag(&mut r)?,
                invitation: r.long_bytes()?.to_vec(),
            },
            DROP => DeviceMsg::Drop {
                fingerprint: r.array()?,
            },
            ADDED => DeviceMsg::Added {
                tag: r.array()?,
                fingerprint: r.array()?,
            },
            SETTINGS => {
                let profile = r.long_bytes()?.to_vec();
                let n = r.u8()? as usize;
                if n > MAX_RELAYS {
                    return Err(CodecError::Invalid("relay count").into());
                }
                let relays = (0..n)
                    .map(|_| {
                        RelayAddress::decode(&mut r).map_err(|e| ProtoError::Address(e.to_string()))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                DeviceMsg::Settings {
                    profile,
                    relays,
                    rotate_days: r.u32()?,
                }
            }
            GROUP => {
                let group = r.array()?;
                let name = utf8(r.short_bytes()?)?;
                let introduce = flag(&mut r)?;
                let n = r.u8()? as usize;
                let members = (0..n).map(|_| r.array()).collect::<Result<Vec<_>, _>>()?;
                DeviceMsg::Group {
                    group,
                    name,
                    introduce,
                    members,
                }
            }
            SIBLING => DeviceMsg::Sibling {
                device: r.array()?,
                name: utf8(r.short_bytes()?)?,
            },
            OFFER => DeviceMsg::Offer {
                via: r.array()?,
                introduce: flag(&mut r)?,
                invitation: r.long_bytes()?.to_vec(),
            },
            HISTORY => {
                let group = r.array()?;
                let n = r.u16()? as usize;
                // Each entry takes at least 37 bytes: refuse counts the
                // message cannot hold before allocating for them.
                if n * 37 > r.remaining() {
                    return Err(CodecError::Truncated.into());
                }
                let entries = (0..n)
                    .map(|_| Entry::decode(&mut r))
                    .collect::<Result<Vec<_>, _>>()?;
                DeviceMsg::History { group, entries }
            }
            COPY => DeviceMsg::Copy {
                group: r.array()?,
                entry: Entry::decode(&mut r)?,
            },
            ANNOUNCE => {
                let group = match r.u8()? {
                    0 => None,
                    1 => Some(r.array()?),
                    _ => return Err(CodecError::Invalid("announce group flag").into()),
                };
                let fingerprint = r.array()?;
                let n = r.u8()? as usize;
                if n > MAX_ANNOUNCED_QUEUES {
                    return Err(CodecError::Invalid("queue count").into());
                }
                let queues = (0..n)
                    .map(|_| {
                        let relay = RelayAddress::decode(&mut r)
                            .map_err(|e| ProtoError::Address(e.to_string()))?;
                        Ok(QueueGrant {
                            relay,
                            recipient_id: r.array()?,
                            auth: Secret32(r.array()?),
                        })
                    })
                    .collect::<Result<Vec<_>, ProtoError>>()?;
                DeviceMsg::Announce {
                    group,
                    fingerprint,
                    queues,
                }
            }
            REMOVED => {
                let n = r.u8()? as usize;
                let fingerprints = (0..n).map(|_| r.array()).collect::<Result<Vec<_>, _>>()?;
                DeviceMsg::Removed { fingerprints }
            }
            PROFILE => DeviceMsg::Profile {
                profile: r.long_bytes()?.to_vec(),
            },
            FORGET => DeviceMsg::Forget { group: r.array()? },
            _ => return Err(CodecError::Invalid("device message type").into()),
        };
        r.finish()?;
        Ok(msg)
    }

    /// Which family the message belongs to: contacts may only send `ADD`,
    /// `DROP` and `ADDED`; everything else comes from the person's own
    /// devices.
    pub fn from_contact_allowed(&self) -> bool {
        matches!(
            self,
            DeviceMsg::Add { .. } | DeviceMsg::Drop { .. } | DeviceMsg::Added { .. }
        )
    }
}

/// Splits a history into HISTORY messages that each fit `max_body` bytes.
pub fn history_messages(group: [u8; 16], entries: Vec<Entry>, max_body: usize) -> Vec<DeviceMsg> {
    const HEAD: usize = 1 + 16 + 2;
    let mut out = Vec::new();
    let mut batch: Vec<Entry> = Vec::new();
    let mut size = HEAD;
    for mut e in entries {
        if HEAD + e.encoded_len() > max_body {
            // Only a text longer than any message could carry (an old or a
            // foreign store): keep what fits, on a character boundary.
            let keep = max_body - HEAD - (e.encoded_len() - e.text.len());
            e.text = clip(&e.text, keep).to_string();
        }
        if size + e.encoded_len() > max_body || batch.len() == u16::MAX as usize {
            out.push(DeviceMsg::History {
                group,
                entries: std::mem::take(&mut batch),
            });
            size = HEAD;
        }
        size += e.encoded_len();
        batch.push(e);
    }
    if !batch.is_empty() {
        out.push(DeviceMsg::History {
            group,
            entries: batch,
        });
    }
    out
}

fn flag(r: &mut Reader<'_>) -> Result<bool, ProtoError> {
    match r.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(CodecError::Invalid("flag").into()),
    }
}

fn utf8(b: &[u8]) -> Result<String, ProtoError> {
    String::from_utf8(b.to_vec()).map_err(|_| CodecError::Invalid("UTF-8 text").into())
}

/// The longest prefix of `s` of at most `max` bytes ending on a character
/// boundary.
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<DeviceMsg> {
        let entry = Entry {
            incoming: true,
            id: [7; 16],
            sent_at_ms: 1,
            received_at_ms: 2,
            text: "héllo".into(),
        };
        vec![
            DeviceMsg::Add {
                name: "server".into(),
                introduce: true,
                invitation: vec![1, 2, 3],
            },
            DeviceMsg::Drop {
                fingerprint: [3; 32],
            },
            DeviceMsg::Added {
                tag: [4; 32],
                fingerprint: [5; 32],
            },
            DeviceMsg::Settings {
                profile: vec![9; 10],
                relays: vec![
                    "tern://AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE:k@127.0.0.1:1"
                        .parse()
                        .unwrap(),
                ],
                rotate_days: 7,
            },
            DeviceMsg::Group {
                group: [1; 16],
                name: "bob".into(),
                introduce: false,
                members: vec![[3; 16], [4; 16]],
            },
            DeviceMsg::Sibling {
                device: [2; 16],
                name: "phone".into(),
            },
            DeviceMsg::Offer {
                via: [4; 16],
                introduce: true,
                invitation: vec![5; 40],
            },
            DeviceMsg::History {
                group: [1; 16],
                entries: vec![entry.clone(), entry.clone()],
            },
            DeviceMsg::Copy {
                group: [1; 16],
                entry,
            },
            DeviceMsg::Announce {
                group: Some([1; 16]),
                fingerprint: [8; 32],
                queues: vec![QueueGrant {
                    relay:
                        "tern://AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE:access_1@127.0.0.1:9"
                            .parse()
                            .unwrap(),
                    recipient_id: [6; 16],
                    auth: Secret32([5; 32]),
                }],
            },
            DeviceMsg::Removed {
                fingerprints: vec![[1; 32], [2; 32]],
            },
            DeviceMsg::Profile {
                profile: vec![1, 2, 3],
            },
            DeviceMsg::Forget { group: [9; 16] },
        ]
    }

    #[test]
    fn every_message_round_trips_and_refuses_truncation_and_trailing_bytes() {
        for m in all() {
            let b = m.encode();
            assert_eq!(DeviceMsg::decode(&b).unwrap(), m);
            for cut in 0..b.len() {
                assert!(DeviceMsg::decode(&b[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            let mut longer = b.clone();
            longer.push(0);
            assert!(DeviceMsg::decode(&longer).is_err());
        }
    }

    #[test]
    fn unknown_types_and_flags_are_refused() {
        assert!(DeviceMsg::decode(&[0x04]).is_err());
        assert!(DeviceMsg::decode(&[0x1A]).is_err());
        assert!(DeviceMsg::decode(&[0xFF]).is_err());
        let mut b = DeviceMsg::Offer {
            via: [1; 16],
            introduce: false,
            invitation: Vec::new(),
        }
        .encode();
        b[17] = 2;
        assert!(DeviceMsg::decode(&b).is_err());
    }

    #[test]
    fn histories_are_split_to_fit_and_keep_every_entry_in_order() {
        let entries: Vec<Entry> = (0..500u32)
            .map(|i| Entry {
                incoming: i % 2 == 0,
                id: [(i % 251) as u8; 16],
                sent_at_ms: u64::from(i),
                received_at_ms: 0,
                text: "x".repeat((i as usize * 7) % 300),
            })
            .collect();
        let msgs = history_messages([1; 16], entries.clone(), 2_000);
        assert!(msgs.len() > 1);
        let mut back = Vec::new();
        for m in &msgs {
            assert!(m.encode().len() <= 2_000);
            match DeviceMsg::decode(&m.encode()).unwrap() {
                DeviceMsg::History { entries, .. } => back.extend(entries),
                _ => unreachable!(),
            }
        }
        assert_eq!(back, entries);
    }

    #[test]
    fn a_text_too_long_for_any_message_is_clipped_not_lost() {
        let e = Entry {
            incoming: false,
            id: [1; 16],
            sent_at_ms: 0,
            received_at_ms: 0,
            text: "é".repeat(2_000),
        };
        let msgs = history_messages([1; 16], vec![e], 1_000);
        assert_eq!(msgs.len(), 1);
        assert!(msgs[0].encode().len() <= 1_000);
    }

    #[test]
    fn only_add_and_drop_may_come_from_contacts() {
        let allowed: Vec<bool> = all().iter().map(DeviceMsg::from_contact_allowed).collect();
        assert_eq!(&allowed[..3], &[true, true, true]);
        assert!(allowed[3..].iter().all(|a| !a));
    }
}
