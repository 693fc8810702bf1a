//! Ratchet resynchronisation (PROTOCOL.md §6.7): what a connection does
//! when its two ratchets have lost step, as they do after one side's state
//! was rolled back (a restored backup, a VM snapshot, a copied home that
//! sent messages) or a chain grew past what can be skipped.
//!
//! ```text
//! X: a message from the peer that the queue layer authenticates but
//!    neither ratchet can place (position used, chain forked, no key)
//!                         ── resync offer (0x03): I', R', X's head ──▶  Y: agree as the joiner,
//!                                                                         rebase Y's chain on X's head,
//!                         ◀── resync accept (0x04): J', E', ratchet ──    re-send what X lacks
//!                              message carrying RESYNCED (Y's head)
//! X: agree as the inviter, rebase on Y's head, re-send what Y lacks
//! ```
//!
//! Both travel under the queue layer (the ratchet is what they replace),
//! the new root key mixes in the connection secret, and the security code,
//! the transcript and the queue layer key stay: the connection is the same
//! one, with a ratchet that starts afresh. The replaced ratchet is kept to
//! read what the peer sent before it switched. A *head* is the last
//! envelope of a direction that the receiver holds (its sequence number and
//! chain hash, §7.5): the sender continues its chain from the receiver's
//! head, and re-sends the texts after it that it still has. When the
//! receiver's head is not on the sender's own chain, the sender learns that
//! its history forked — another copy of its state sent in its name — and
//! says so.

use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use tern_wire::codec::{Reader, Writer};

use super::connection::{Action, ConnState, Connection, Incoming, Received};
use super::envelope::{ChainSender, Envelope, Kind};
use super::handshake::{resync_accepter_agree, resync_offerer_agree, InviterSecrets};
use super::keys::{b64, KemSeed, KEM_EK_LEN};
use super::queue_msg::{self, TYPE_RESYNC_ACCEPT, TYPE_RESYNC_OFFER};
use super::ratchet::Ratchet;
use super::rotation::Control;
use super::ProtoError;

/// Texts kept for re-sending after a resync: at most this many...
pub const RESEND_COUNT: usize = 32;
/// ...holding at most this many body bytes in all.
pub const RESEND_BYTES: usize = 32 * 1024;

/// Our resync offer, until the peer accepts it.
#[derive(Clone, Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct ResyncOffer {
    pub secrets: InviterSecrets,
    /// The ML-KEM key pair whose encapsulation key the offer carries, so
    /// that the new ratchet is hybrid from its first message.
    pub kem: KemSeed,
    pub started_ms: u64,
}

/// A text we sent, kept to send again if the peer turns out to lack it.
#[derive(Clone, Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct Sent {
    pub seq: u64,
    #[serde(with = "b64")]
    pub hash: [u8; 32],
    #[serde(with = "b64")]
    pub id: [u8; 16],
    pub sent_at_ms: u64,
    pub body: Vec<u8>,
}

/// How a resync went, for the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncReport {
    /// The peer holds envelopes of our direction that this state never sent
    /// (another copy of this state sent them), or more than this state
    /// knows of (this state was restored from an older copy).
    pub forked: bool,
    /// Texts sent again on the new ratchet.
    pub resent: usize,
}

fn offer_body(i: &[u8; 32], r: &[u8; 32], ek: &[u8], head: (u64, [u8; 32])) -> Vec<u8> {
    let mut w = Writer::with_capacity(queue_msg::RESYNC_OFFER_LEN);
    w.bytes(i).bytes(r).bytes(ek).u64(head.0).bytes(&head.1);
    w.into_vec()
}

impl Connection {
    /// Records a text we send, for re-sending after a resync.
    pub(crate) fn keep_for_resend(&mut self, env: &Envelope) {
        if env.kind != Kind::Text {
            return;
        }
        self.resend.push(Sent {
            seq: env.seq,
            hash: env.chain_hash(),
            id: env.id,
            sent_at_ms: env.sent_at_ms,
            body: env.body.clone(),
        });
        let mut total: usize = self.resend.iter().map(|s| s.body.len()).sum();
        while self.resend.len() > RESEND_COUNT || (total > RESEND_BYTES && self.resend.len() > 1) {
            total -= self.resend.remove(0).body.len();
        }
    }

    /// The last envelope we hold of the peer's direction.
    fn head(&self) -> (u64, [u8; 32]) {
        let seq = self.chain_in.highest;
        (seq, self.chain_in.hash_of(seq).unwrap_or([0; 32]))
    }

    /// Whether a failure of the current ratchet on an authentic message
    /// (the queue layer opened) means the ratchets have lost step.
    pub(crate) fn lost_step(&self, e: &ProtoError) -> bool {
        self.state == ConnState::Connected
            && self.resync.is_none()
            && matches!(
                e,
                ProtoError::Decrypt
                    | ProtoError::Duplicate
                    | ProtoError::ChainMismatch
                    | ProtoError::TooManySkipped(_)
            )
    }

    /// Starts a resync: fresh `I'`, `R'` sent with our head to every peer
    /// queue. Also the way to force one (`tern` does so on its own).
    pub fn start_resync<R: RngCore + CryptoRng>(
        &mut self,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Vec<Action>, ProtoError> {
        if self.state != ConnState::Connected || self.connection_secret.is_none() {
            return Err(ProtoError::NotReady);
        }
        let secrets = InviterSecrets::generate(rng);
        let kem = KemSeed::generate(rng);
        let body = offer_body(
            &secrets.invitation.public(),
            &secrets.ratchet.public(),
            &kem.encapsulation_key(),
            self.head(),
        );
        let mut envelope_id = [0u8; 16];
        rng.fill_bytes(&mut envelope_id);
        self.resync = Some(ResyncOffer {
            secrets,
            kem,
            started_ms: now_ms,
        });
        Ok(vec![Action::Deliver {
            envelope_id,
            ratchet_msg: queue_msg::resync_payload(TYPE_RESYNC_OFFER, &body),
            signed: true,
        }])
    }

    /// A resync offer or accept (already out of the queue layer).
    pub(crate) fn receive_resync<R: RngCore + CryptoRng>(
        &mut self,
        kind: u8,
        body: &[u8],
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Received, ProtoError> {
        let digest = queue_msg::digest(body);
        if self.state != ConnState::Connected {
            // Resyncs are between connected peers only.
            return Err(ProtoError::Duplicate);
        }
        let th = self.keys.as_ref().ok_or(ProtoError::NotReady)?.transcript();
        let cs = self.connection_secret.clone().ok_or(ProtoError::NotReady)?;
        let mut r = Reader::new(body);
        let (incoming, actions) = if kind == TYPE_RESYNC_OFFER {
            let i: [u8; 32] = r.array()?;
            let rk: [u8; 32] = r.array()?;
            let ek = r.bytes(KEM_EK_LEN)?.to_vec();
            let head = (r.u64()?, r.array()?);
            r.finish()?;
            if let Some(ours) = &self.resync {
                // Both sides offered at once: the offer with the greater R'
                // wins, so exactly one of them answers.
                if ours.secrets.ratchet.public() > rk {
                    return Ok(Received {
                        incoming: Incoming::Nothing,
                        actions: Vec::new(),
                        digest,
                    });
                }
            }
            self.resync = None;
            let (init, j, e) = resync_accepter_agree(&th, &cs, &i, &rk, rng)?;
            let ratchet = Ratchet::init_initiator_pq(&init, &rk, Some(&ek), rng)?;
            let ours = self.head();
            let (forked, resend) = self.rebase(head);
            let report = ResyncReport {
                forked,
                resent: resend.len(),
            };
            self.previous = self.ratchet.replace(ratchet);
            let mut id = [0u8; 16];
            rng.fill_bytes(&mut id);
            let resynced = Control::Resynced {
                head_seq: ours.0,
                head_hash: ours.1,
            };
            let Action::Deliver { ratchet_msg, .. } =
                self.encrypt_any(Kind::Control, id, resynced.encode(), now_ms, true, rng)?
            else {
                unreachable!("encrypt_any delivers")
            };
            let mut accept = Vec::with_capacity(queue_msg::RESYNC_ACCEPT_LEN);
            accept.extend_from_slice(&j);
            accept.extend_from_slice(&e);
            accept.extend_from_slice(&ratchet_msg);
            let mut actions = vec![Action::Deliver {
                envelope_id: id,
                ratchet_msg: queue_msg::resync_payload(TYPE_RESYNC_ACCEPT, &accept),
                signed: true,
            }];
            actions.extend(self.resend_all(resend, rng)?);
            (self.resynced(report, now_ms), actions)
        } else {
            let j: [u8; 32] = r.array()?;
            let e: [u8; 32] = r.array()?;
            let ratchet_msg = r.bytes(queue_msg::RATCHET_MSG_LEN)?;
            r.finish()?;
            // An accept of an offer we no longer hold (answered already, or
            // replaced by the peer's) is a late copy.
            let offer = self.resync.as_ref().ok_or(ProtoError::Duplicate)?;
            let init = resync_offerer_agree(&offer.secrets, &th, &cs, &j, &e)?;
            let mut ratchet = Ratchet::init_responder_pq(
                &init,
                offer.secrets.ratchet.clone(),
                Some(offer.kem.clone()),
            );
            let env = Envelope::decode(&ratchet.decrypt(ratchet_msg, rng)?)?;
            let head = match (env.kind, Control::decode(&env.body)?) {
                (
                    Kind::Control,
                    Some(Control::Resynced {
                        head_seq,
                        head_hash,
                    }),
                ) => (head_seq, head_hash),
                _ => {
                    return Err(tern_wire::codec::CodecError::Invalid(
                        "a resync accept starts with RESYNCED",
                    )
                    .into())
                }
            };
            self.chain_in
                .check(&env)
                .map_err(super::connection::chain_err)?;
            self.chain_in.record(&env);
            self.resync = None;
            self.previous = self.ratchet.replace(ratchet);
            let (forked, resend) = self.rebase(head);
            let report = ResyncReport {
                forked,
                resent: resend.len(),
            };
            let actions = self.resend_all(resend, rng)?;
            (self.resynced(report, now_ms), actions)
        };
        Ok(Received {
            incoming,
            actions,
            digest,
        })
    }

    fn resynced(&mut self, report: ResyncReport, now_ms: u64) -> Incoming {
        self.last_resync_ms = now_ms;
        Incoming::Resynced(report)
    }

    /// Continues our chain from the peer's `head` of it; returns what the
    /// peer lacks of the texts we kept.
    fn rebase(&mut self, head: (u64, [u8; 32])) -> (bool, Vec<Sent>) {
        let (seq, hash) = head;
        let ours = if seq == self.chain_out.last_seq {
            Some(self.chain_out.last_hash)
        } else if seq == 0 {
            Some([0; 32])
        } else {
            self.resend.iter().find(|s| s.seq == seq).map(|s| s.hash)
        };
        let forked = seq > self.chain_out.last_seq || ours.is_some_and(|h| h != hash);
        let kept = std::mem::take(&mut self.resend);
        // On a fork we cannot tell which of ours the peer has: send them
        // all again (receivers keep one copy of a text per envelope id).
        let resend = kept.into_iter().filter(|s| forked || s.seq > seq).collect();
        self.chain_out = ChainSender {
            last_seq: seq,
            last_hash: hash,
        };
        (forked, resend)
    }

    fn resend_all<R: RngCore + CryptoRng>(
        &mut self,
        resend: Vec<Sent>,
        rng: &mut R,
    ) -> Result<Vec<Action>, ProtoError> {
        resend
            .into_iter()
            .map(|s| self.encrypt_any(Kind::Text, s.id, s.body, s.sent_at_ms, true, rng))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::connection::tests::{connect, profile};
    use crate::proto::envelope::ChainStatus;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// Everything `from` delivers in `actions`, as uploaded to its peer's
    /// queue 0, handed to `to`; the results in order.
    fn deliver(
        from: &Connection,
        to: &mut Connection,
        actions: &[Action],
        rng: &mut StdRng,
    ) -> Vec<Result<Received, ProtoError>> {
        let q = to.recv_queues[0].recipient_id;
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Deliver { ratchet_msg, .. } => Some(ratchet_msg),
                _ => None,
            })
            .map(|p| {
                let up = from.queue_message(0, p, rng).unwrap();
                to.receive(&q, &up, &profile("x"), 50, rng)
            })
            .collect()
    }

    fn text(c: &mut Connection, t: &str, rng: &mut StdRng) -> Vec<Action> {
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        vec![c
            .encrypt(Kind::Text, id, t.as_bytes().to_vec(), 40, rng)
            .unwrap()]
    }

    fn texts(rs: &[Result<Received, ProtoError>]) -> Vec<String> {
        rs.iter()
            .filter_map(|r| match r {
                Ok(Received {
                    incoming: Incoming::Text { text, .. },
                    ..
                }) => Some(text.clone()),
                _ => None,
            })
            .collect()
    }

    /// Issue 14 item 7 in the protocol core: a copy of Alice's state sends
    /// first, then Alice at the same ratchet position. Bob detects the fork
    /// and offers a resync; Alice, answering, learns that her history
    /// forked and sends her text again; nothing is lost and both go on.
    #[test]
    fn a_forked_sender_is_detected_resynchronised_and_loses_nothing() {
        let mut rng = StdRng::seed_from_u64(21);
        let (mut alice, mut bob) = connect(&mut rng);
        let mut copy = alice.clone();
        let a = text(&mut copy, "from the copy", &mut rng);
        assert_eq!(
            texts(&deliver(&copy, &mut bob, &a, &mut rng)),
            ["from the copy"]
        );
        let a = text(&mut alice, "from the original", &mut rng);
        let r = deliver(&alice, &mut bob, &a, &mut rng);
        let Ok(Received {
            incoming: Incoming::ResyncStarted { reason },
            actions: offer,
            ..
        }) = &r[0]
        else {
            panic!("{r:?}")
        };
        assert_eq!(*reason, ProtoError::Duplicate);
        assert!(bob.resync.is_some());
        let r = deliver(&bob, &mut alice, offer, &mut rng);
        let Ok(Received {
            incoming: Incoming::Resynced(report),
            actions: accept,
            ..
        }) = &r[0]
        else {
            panic!("{r:?}")
        };
        assert_eq!(
            *report,
            ResyncReport {
                forked: true,
                resent: 1
            }
        );
        let r = deliver(&alice, &mut bob, accept, &mut rng);
        assert!(matches!(
            r[0],
            Ok(Received {
                incoming: Incoming::Resynced(ResyncReport { forked: false, .. }),
                ..
            })
        ));
        assert_eq!(texts(&r), ["from the original"]);
        assert!(bob.resync.is_none());
        // Both directions work on the new ratchet, in order.
        for _ in 0..2 {
            let a = text(&mut alice, "a", &mut rng);
            let r = deliver(&alice, &mut bob, &a, &mut rng);
            assert!(
                matches!(
                    &r[0],
                    Ok(Received {
                        incoming: Incoming::Text {
                            chain: ChainStatus::InOrder,
                            ..
                        },
                        ..
                    })
                ),
                "{r:?}"
            );
            let b = text(&mut bob, "b", &mut rng);
            let r = deliver(&bob, &mut alice, &b, &mut rng);
            assert_eq!(texts(&r), ["b"]);
        }
        // The security code is the connection's, unchanged.
        assert_eq!(alice.security_code(), bob.security_code());
    }

    /// A side restored from an older backup cannot read what the peer sent
    /// since: it detects that itself, resyncs, and the peer re-sends the
    /// texts it still has.
    #[test]
    fn a_restored_backup_detects_it_is_behind_and_recovers() {
        let mut rng = StdRng::seed_from_u64(22);
        let (mut alice, mut bob) = connect(&mut rng);
        let backup = bob.clone();
        for t in ["one", "two"] {
            let a = text(&mut alice, t, &mut rng);
            deliver(&alice, &mut bob, &a, &mut rng);
            let b = text(&mut bob, "ok", &mut rng);
            deliver(&bob, &mut alice, &b, &mut rng);
        }
        let mut bob = backup;
        let a = text(&mut alice, "three", &mut rng);
        let r = deliver(&alice, &mut bob, &a, &mut rng);
        let Ok(Received {
            incoming: Incoming::ResyncStarted { .. },
            actions: offer,
            ..
        }) = &r[0]
        else {
            panic!("{r:?}")
        };
        let r = deliver(&bob, &mut alice, offer, &mut rng);
        let Ok(Received {
            incoming: Incoming::Resynced(report),
            actions: accept,
            ..
        }) = &r[0]
        else {
            panic!("{r:?}")
        };
        // Bob holds none of Alice's texts: all three come again; Alice also
        // learns that the Bob she talks to forgot two of his own messages.
        assert_eq!(report.resent, 3);
        let r = deliver(&alice, &mut bob, accept, &mut rng);
        let Ok(Received {
            incoming: Incoming::Resynced(report),
            ..
        }) = &r[0]
        else {
            panic!("{r:?}")
        };
        assert!(
            report.forked,
            "Bob's state is older than what Alice holds of it"
        );
        assert_eq!(texts(&r), ["one", "two", "three"]);
        let b = text(&mut bob, "back", &mut rng);
        assert_eq!(texts(&deliver(&bob, &mut alice, &b, &mut rng)), ["back"]);
    }

    /// Both sides offer at once: exactly one offer is answered.
    #[test]
    fn simultaneous_offers_settle_on_one() {
        let mut rng = StdRng::seed_from_u64(23);
        let (mut alice, mut bob) = connect(&mut rng);
        let oa = alice.start_resync(1, &mut rng).unwrap();
        let ob = bob.start_resync(1, &mut rng).unwrap();
        let ra = deliver(&bob, &mut alice, &ob, &mut rng);
        let rb = deliver(&alice, &mut bob, &oa, &mut rng);
        let answered: Vec<&Received> = ra
            .iter()
            .chain(&rb)
            .map(|r| r.as_ref().unwrap())
            .filter(|r| matches!(r.incoming, Incoming::Resynced(_)))
            .collect();
        assert_eq!(answered.len(), 1);
        let (from, to) = if alice.resync.is_none() {
            (&alice, &mut bob)
        } else {
            (&bob, &mut alice)
        };
        let r = deliver(from, to, &answered[0].actions, &mut rng);
        assert!(matches!(
            r[0],
            Ok(Received {
                incoming: Incoming::Resynced(_),
                ..
            })
        ));
        let a = text(&mut alice, "a", &mut rng);
        assert_eq!(texts(&deliver(&alice, &mut bob, &a, &mut rng)), ["a"]);
        let b = text(&mut bob, "b", &mut rng);
        assert_eq!(texts(&deliver(&bob, &mut alice, &b, &mut rng)), ["b"]);
    }
}
