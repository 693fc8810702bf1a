//! Queue rotation (PROTOCOL.md §Rotation): a receiver moves one direction
//! of a connection to fresh queues — new ids, new keys, possibly new relays
//! — through control messages inside the ratchet, so relays see unrelated
//! queues appear and old ones vanish, and nothing links them.
//!
//! The receiver R rotates its receiving queues; S is the peer sending to them.
//!
//! ```text
//! R: creates new queues            ── QADD(new queues) ──▶  S: fresh sender key per queue
//!                                  ◀── QKEY(keys) ───────   (still sending on the old queues)
//! R: SECUREs the new queues, polls old and new
//!                                  ── QUSE ─────────────▶  S: switches; deliveries that reached
//!                                                             no old queue are re-aimed
//!                                  ◀── QSWITCHED ────────   first message on the new queues
//! R: drains the old queues, then DELETEs them
//! ```
//!
//! Control bodies: `u8 type` then: QADD (1) a queue list (count byte +
//! SendQueues); QKEY (2) the rotation tag (16) and a key list (count byte +
//! 32-byte Ed25519 keys, one per announced queue, in order); QUSE (3) the
//! rotation tag (16); QSWITCHED (4), QRETIRED (6, after a re-key: "nothing
//! more on the previous connection") and QROTATE (5, "please rotate yours")
//! empty. The rotation tag is the sender id of the first announced queue:
//! it ties answers to the announcement they answer, so a late copy from an
//! abandoned rotation cannot be applied to a newer one.
//! Every step is idempotent against copies (dedup) and survives restarts
//! because the state lives in [`Connection`]; a rotation that stalls can be
//! replaced by starting a new one.

use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use tern_wire::codec::{CodecError, Reader, Writer};
use tern_wire::Id;

use super::connection::{random_id, Action, ConnState, Connection, Incoming, PeerQueue, RecvQueue};
use super::envelope::Kind;
use super::invitation::{decode_queues, encode_queues, SendQueue, MAX_QUEUES};
use super::keys::Secret32;
use super::ProtoError;

const QADD: u8 = 1;
const QKEY: u8 = 2;
const QUSE: u8 = 3;
const QSWITCHED: u8 = 4;
const QROTATE: u8 = 5;
const QRETIRED: u8 = 6;
const RESYNCED: u8 = 7;

/// A rotation of our receiving queues in progress.
#[derive(Clone, Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct Rotation {
    pub new_queues: Vec<RecvQueue>,
    pub started_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Add(Vec<SendQueue>),
    Keys {
        tag: Id,
        keys: Vec<[u8; 32]>,
    },
    Use {
        tag: Id,
    },
    Switched,
    Rotate,
    /// After a re-key: nothing more will be sent on the previous connection.
    Retired,
    /// The first envelope on a resynchronised ratchet (PROTOCOL.md §6.7):
    /// the last envelope of the receiver's direction the sender holds.
    Resynced {
        head_seq: u64,
        head_hash: [u8; 32],
    },
}

impl Control {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match self {
            Control::Add(q) => {
                w.u8(QADD);
                encode_queues(q, &mut w);
            }
            Control::Keys { tag, keys } => {
                w.u8(QKEY).bytes(tag).u8(keys.len() as u8);
                for k in keys {
                    w.bytes(k);
                }
            }
            Control::Use { tag } => {
                w.u8(QUSE).bytes(tag);
            }
            Control::Switched => {
                w.u8(QSWITCHED);
            }
            Control::Retired => {
                w.u8(QRETIRED);
            }
            Control::Rotate => {
                w.u8(QROTATE);
            }
            Control::Resynced {
                head_seq,
                head_hash,
            } => {
                w.u8(RESYNCED).u64(*head_seq).bytes(head_hash);
            }
        }
        w.into_vec()
    }

    /// `Ok(None)` for a control type from a newer version.
    pub fn decode(b: &[u8]) -> Result<Option<Self>, ProtoError> {
        let mut r = Reader::new(b);
        let c = match r.u8()? {
            QADD => Control::Add(decode_queues(&mut r)?),
            QKEY => {
                let tag = r.array()?;
                let n = r.u8()? as usize;
                if n == 0 || n > MAX_QUEUES {
                    return Err(CodecError::Invalid("key count").into());
                }
                let keys = (0..n).map(|_| r.array()).collect::<Result<_, _>>()?;
                Control::Keys { tag, keys }
            }
            QUSE => Control::Use { tag: r.array()? },
            QSWITCHED => Control::Switched,
            QROTATE => Control::Rotate,
            QRETIRED => Control::Retired,
            RESYNCED => Control::Resynced {
                head_seq: r.u64()?,
                head_hash: r.array()?,
            },
            _ => return Ok(None),
        };
        r.finish()?;
        Ok(Some(c))
    }
}

impl Connection {
    fn control<R: RngCore + CryptoRng>(
        &mut self,
        c: Control,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Action, ProtoError> {
        let id = random_id(rng);
        self.encrypt_any(Kind::Control, id, c.encode(), now_ms, true, rng)
    }

    /// Whether a rotation of our receiving queues is under way.
    pub fn rotating(&self) -> bool {
        self.rotation.is_some()
    }

    /// Starts moving our receiving queues to `new_queues` (freshly created
    /// by the client). A rotation already under way is abandoned: its new
    /// queues are returned so the client can delete them.
    pub fn start_rotation<R: RngCore + CryptoRng>(
        &mut self,
        new_queues: Vec<RecvQueue>,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<(Vec<Action>, Vec<RecvQueue>), ProtoError> {
        if self.state != ConnState::Connected {
            return Err(ProtoError::NotReady);
        }
        if new_queues.is_empty() || new_queues.len() > MAX_QUEUES {
            return Err(CodecError::Invalid("queue count").into());
        }
        let announce = Control::Add(new_queues.iter().map(RecvQueue::send_queue).collect());
        let action = self.control(announce, now_ms, rng)?;
        let abandoned = self
            .rotation
            .take()
            .map(|r| r.new_queues)
            .unwrap_or_default();
        self.rotation = Some(Rotation {
            new_queues,
            started_ms: now_ms,
        });
        Ok((vec![action], abandoned))
    }

    /// Asks the peer to rotate the queues we send to.
    pub fn request_rotation<R: RngCore + CryptoRng>(
        &mut self,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Action, ProtoError> {
        if self.state != ConnState::Connected {
            return Err(ProtoError::NotReady);
        }
        self.control(Control::Rotate, now_ms, rng)
    }

    pub(crate) fn apply_control<R: RngCore + CryptoRng>(
        &mut self,
        body: &[u8],
        now_ms: u64,
        rng: &mut R,
    ) -> Result<(Incoming, Vec<Action>), ProtoError> {
        let Some(control) = Control::decode(body)? else {
            return Ok((
                Incoming::Unsupported {
                    kind: Kind::Control.code(),
                },
                Vec::new(),
            ));
        };
        match control {
            // S: the peer announces new queues; make a sender key for each.
            Control::Add(queues) => {
                let fresh: Vec<PeerQueue> = queues
                    .into_iter()
                    .map(|q| PeerQueue {
                        relay: q.relay,
                        sender_id: q.sender_id,
                        auth: Secret32::random(rng),
                    })
                    .collect();
                let keys = fresh
                    .iter()
                    .map(|q| q.signing_key().verifying_key().to_bytes())
                    .collect();
                let tag = fresh[0].sender_id;
                self.peer_rotation = Some(fresh);
                let action = self.control(Control::Keys { tag, keys }, now_ms, rng)?;
                Ok((Incoming::RotationStep, vec![action]))
            }
            // R: the peer's keys for our new queues: secure them, start
            // polling them, and tell the peer to switch.
            Control::Keys { tag, keys } => {
                let current = self.rotation.as_ref().map(|r| r.new_queues[0].sender_id);
                if current != Some(tag) {
                    // For a rotation we abandoned (or already completed).
                    return Ok((Incoming::RotationStep, Vec::new()));
                }
                let mut rotation = self.rotation.take().expect("checked above");
                if keys.len() != rotation.new_queues.len() {
                    self.rotation = Some(rotation);
                    return Err(CodecError::Invalid("one key per new queue").into());
                }
                for (q, k) in rotation.new_queues.iter_mut().zip(&keys) {
                    q.secured_with = Some(*k);
                }
                let mut actions = self.secure_all(&rotation.new_queues);
                actions.push(self.control(Control::Use { tag }, now_ms, rng)?);
                let old = std::mem::replace(&mut self.recv_queues, rotation.new_queues);
                self.retired_queues.extend(old);
                self.last_rotated_ms = now_ms;
                Ok((Incoming::RotationStep, actions))
            }
            // S: our new keys are registered: switch and say so on the new queues.
            Control::Use { tag } => {
                if self.peer_rotation.as_ref().map(|p| p[0].sender_id) != Some(tag) {
                    return Ok((Incoming::RotationStep, Vec::new()));
                }
                let fresh = self.peer_rotation.take().expect("checked above");
                self.peer_queues = fresh;
                let switched = self.control(Control::Switched, now_ms, rng)?;
                Ok((Incoming::RotationStep, vec![Action::Switched, switched]))
            }
            // R: the peer sends only to the new queues now: retire the old.
            Control::Switched => {
                let actions = self
                    .retired_queues
                    .iter()
                    .map(|q| Action::DeleteQueue {
                        recipient_id: q.recipient_id,
                    })
                    .collect();
                Ok((Incoming::PeerSwitched, actions))
            }
            Control::Rotate => Ok((Incoming::RotationRequested, Vec::new())),
            Control::Retired => Ok((Incoming::PeerLeftPrevious, Vec::new())),
            // Meaningful only as the first envelope of a resync accept
            // (which `resync` handles); a copy elsewhere changes nothing.
            Control::Resynced { .. } => Ok((Incoming::Nothing, Vec::new())),
        }
    }

    /// Forgets a receiving queue once the client has deleted it.
    pub fn forget_queue(&mut self, recipient_id: &Id) {
        self.retired_queues
            .retain(|q| &q.recipient_id != recipient_id);
        self.recv_queues.retain(|q| &q.recipient_id != recipient_id);
    }

    /// After a re-key, tells the peer (on the new connection) that nothing
    /// more will be sent on the previous one.
    pub fn announce_retired<R: RngCore + CryptoRng>(
        &mut self,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Action, ProtoError> {
        self.control(Control::Retired, now_ms, rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::connection::tests::{connect, profile, queues};
    use crate::proto::connection::Received;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// Delivers every Deliver action from `from` to `to` (on `to`'s first
    /// current queue), returning what `to` made of each.
    fn deliver(
        from: &Connection,
        to: &mut Connection,
        actions: &[Action],
        rng: &mut StdRng,
    ) -> Vec<Received> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Deliver { ratchet_msg, .. } => Some(ratchet_msg),
                _ => None,
            })
            .map(|m| {
                let up = from.queue_message(0, m, rng).unwrap();
                let rid = to
                    .all_recv_queues()
                    .find(|q| q.sender_id == from.peer_queues[0].sender_id)
                    .unwrap()
                    .recipient_id;
                to.receive(&rid, &up, &profile("x"), 5, rng).unwrap()
            })
            .collect()
    }

    #[test]
    fn control_round_trip() {
        let q = crate::proto::invitation::tests::sample(2).queues;
        for c in [
            Control::Add(q),
            Control::Keys {
                tag: [3; 16],
                keys: vec![[1; 32]],
            },
            Control::Use { tag: [4; 16] },
            Control::Switched,
            Control::Rotate,
            Control::Retired,
        ] {
            assert_eq!(Control::decode(&c.encode()).unwrap(), Some(c));
        }
        assert_eq!(Control::decode(&[99]).unwrap(), None);
        let mut no_keys = vec![QKEY];
        no_keys.extend_from_slice(&[0; 17]);
        assert!(Control::decode(&no_keys).is_err());
    }

    #[test]
    fn full_rotation_moves_queues_and_messages_keep_flowing() {
        let mut rng = StdRng::seed_from_u64(7);
        let (mut alice, mut bob) = connect(&mut rng);
        let old: Vec<_> = bob.recv_queues.iter().map(|q| q.recipient_id).collect();
        // Bob rotates his receiving queues to two fresh ones.
        let (announce, abandoned) = bob
            .start_rotation(queues(&mut rng, 2, 9), 5, &mut rng)
            .unwrap();
        assert!(abandoned.is_empty());
        let r = deliver(&bob, &mut alice, &announce, &mut rng);
        assert!(alice.peer_rotation.is_some());
        // Alice keeps sending on the old queues meanwhile.
        let Action::Deliver {
            ratchet_msg: before_switch,
            ..
        } = alice
            .encrypt(Kind::Text, [1; 16], b"during".to_vec(), 5, &mut rng)
            .unwrap()
        else {
            panic!()
        };
        let r = deliver(&alice, &mut bob, &r[0].actions, &mut rng);
        assert_eq!(r[0].actions.len(), 3, "secure ×2 then QUSE");
        assert!(matches!(r[0].actions[0], Action::Secure { .. }));
        assert_eq!(bob.retired_queues.len(), 3);
        assert_eq!(bob.recv_queues.len(), 2);
        let up = alice.queue_message(0, &before_switch, &mut rng).unwrap();
        let r2 = bob
            .receive(&old[0], &up, &profile("bob"), 6, &mut rng)
            .unwrap();
        assert!(matches!(r2.incoming, Incoming::Text { ref text, .. } if text == "during"));
        let r = deliver(&bob, &mut alice, &r[0].actions, &mut rng);
        assert_eq!(r[0].actions[0], Action::Switched);
        assert_eq!(alice.peer_queues.len(), 2);
        assert_eq!(alice.peer_queues[0].sender_id, bob.recv_queues[0].sender_id);
        let r = deliver(&alice, &mut bob, &r[0].actions, &mut rng);
        let deletes: Vec<_> = r[0]
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::DeleteQueue { recipient_id } => Some(*recipient_id),
                _ => None,
            })
            .collect();
        assert_eq!(deletes, old);
        for rid in &deletes {
            bob.forget_queue(rid);
        }
        assert!(bob.retired_queues.is_empty());
        // Messages flow on the new queues.
        let a = alice
            .encrypt(Kind::Text, [2; 16], b"after".to_vec(), 7, &mut rng)
            .unwrap();
        let r = deliver(&alice, &mut bob, &[a], &mut rng);
        assert!(matches!(r[0].incoming, Incoming::Text { ref text, .. } if text == "after"));
    }

    #[test]
    fn rotation_request_and_restart() {
        let mut rng = StdRng::seed_from_u64(8);
        let (mut alice, mut bob) = connect(&mut rng);
        let req = alice.request_rotation(5, &mut rng).unwrap();
        let r = deliver(&alice, &mut bob, &[req], &mut rng);
        assert_eq!(r[0].incoming, Incoming::RotationRequested);
        let (_, first) = bob
            .start_rotation(queues(&mut rng, 1, 7), 5, &mut rng)
            .unwrap();
        assert!(first.is_empty());
        let (_, abandoned) = bob
            .start_rotation(queues(&mut rng, 1, 8), 6, &mut rng)
            .unwrap();
        assert_eq!(
            abandoned.len(),
            1,
            "a restarted rotation hands back the queues to delete"
        );
    }
}
