//! A connection's state machine (PROTOCOL.md §5): invitation, handshake,
//! and then ordinary messages, with no I/O.
//!
//! The client creates queues on relays (that is I/O), hands the results to
//! this module, and carries out the [`Action`]s it returns, in order, after
//! saving the new state. Everything a relay could see or change is
//! authenticated here, so the client can treat relays as untrusted pipes.
//!
//! ```text
//! inviter                                   joiner
//! Invited ──(invitation, out of band)────▶  accept: Joining
//!         ◀── connection request (Hello) ── unsigned, to every inviter queue
//! Accepted: secure own queues with the
//!           joiner's sender keys, then
//!         ── HelloReply ─────────────────▶  unsigned, to every reply queue
//!                                           Connected: secure own queues, then
//!         ◀── Confirm ───────────────────── signed
//! Connected
//! ```
//!
//! A side sends its own messages only once Connected, because before that
//! the peer's queues are not yet secured to accept signed sends.

use ed25519_dalek::SigningKey;
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use tern_wire::address::RelayAddress;
use tern_wire::Id;

use super::envelope::{ChainError, ChainReceiver, ChainSender, ChainStatus, Envelope, Kind};
use super::handshake::{invitation_hash, joiner_agree, HandshakeKeys, InviterSecrets};
use super::hello::{negotiate, Channel, Hello, HelloReply, Profile};
use super::invitation::{Invitation, SendQueue, KIND_CONTACT, KIND_DEVICE};
use super::keys::{b64, b64vec, DhKeyPair, Secret32};
use super::queue_msg::{self, QueueMessage};
use super::ratchet::Ratchet;
use super::security_code::security_code;
use super::{ProtoError, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Keys generated before asking a relay to create a queue.
#[derive(Clone, Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct QueueKeys {
    /// Ed25519 seed of the recipient's auth key.
    pub auth: Secret32,
    pub dh: DhKeyPair,
}

impl QueueKeys {
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        Self {
            auth: Secret32::random(rng),
            dh: DhKeyPair::generate(rng),
        }
    }

    pub fn auth_public(&self) -> [u8; 32] {
        SigningKey::from_bytes(self.auth.as_bytes())
            .verifying_key()
            .to_bytes()
    }
}

/// One of our receiving queues.
#[derive(Clone, Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct RecvQueue {
    /// Our relay, as in our relay list (it may carry our access key).
    #[serde(with = "address_text")]
    pub relay: RelayAddress,
    #[serde(with = "b64")]
    pub recipient_id: Id,
    #[serde(with = "b64")]
    pub sender_id: Id,
    /// Ed25519 seed signing our commands on this queue.
    pub auth: Secret32,
    /// The secret shared with the relay for this queue's deliveries.
    pub queue_secret: Secret32,
    /// The sender key registered with SECURE, once done.
    #[serde(default, with = "opt_key")]
    pub secured_with: Option<[u8; 32]>,
}

impl RecvQueue {
    /// Completes a queue from the relay's CREATE answer.
    pub fn created(
        relay: RelayAddress,
        keys: &QueueKeys,
        recipient_id: Id,
        sender_id: Id,
        relay_dh: &[u8; 32],
    ) -> Result<Self, ProtoError> {
        Ok(Self {
            relay,
            recipient_id,
            sender_id,
            auth: keys.auth.clone(),
            queue_secret: keys.dh.dh(relay_dh)?,
            secured_with: None,
        })
    }

    pub fn signing_key(&self) -> SigningKey {
        SigningKey::from_bytes(self.auth.as_bytes())
    }

    /// The queue as a sender must know it.
    pub fn send_queue(&self) -> SendQueue {
        SendQueue {
            relay: self.relay.without_access_key(),
            sender_id: self.sender_id,
        }
    }
}

/// One of the peer's queues that we send to.
#[derive(Clone, Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct PeerQueue {
    #[serde(with = "address_text")]
    pub relay: RelayAddress,
    #[serde(with = "b64")]
    pub sender_id: Id,
    /// Ed25519 seed signing our sends to this queue.
    pub auth: Secret32,
}

impl PeerQueue {
    pub fn signing_key(&self) -> SigningKey {
        SigningKey::from_bytes(self.auth.as_bytes())
    }
}

pub mod address_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use tern_wire::address::RelayAddress;

    pub fn serialize<S: Serializer>(a: &RelayAddress, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&a.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<RelayAddress, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

mod opt_key {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct W(#[serde(with = "super::b64")] [u8; 32]);

    pub fn serialize<S: Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        v.map(W).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnState {
    /// Inviter: invitation made, no request yet.
    Invited,
    /// Joiner: request sent, waiting for the inviter's reply.
    Joining,
    /// Inviter: reply sent, waiting for the joiner's confirmation.
    Accepted,
    Connected,
}

/// How much to trust that the keys are the peer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SecurityLevel {
    /// The invitation travelled as a link or file through some other channel:
    /// whoever controlled that channel could have replaced it.
    Shared,
    /// A QR code was shown on a screen and scanned in person.
    InPerson,
    /// Security codes were compared out of band.
    Verified,
}

/// Something the client must do, in order, after saving the new state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// SECURE our receiving queue with the sender key recorded in it.
    Secure {
        #[serde(with = "b64")]
        recipient_id: Id,
    },
    /// A retired receiving queue: once it is empty, DELETE it on its relay
    /// and forget it (queue rotation).
    DeleteQueue {
        #[serde(with = "b64")]
        recipient_id: Id,
    },
    /// The peer queues were replaced (queue rotation): deliveries that have
    /// not reached any old queue must be re-aimed at the new ones, before
    /// the deliveries that follow this action.
    Switched,
    /// Send a ratchet message to every peer queue; `signed` is false only for
    /// the handshake's first message on a fresh queue.
    Deliver {
        #[serde(with = "b64")]
        envelope_id: [u8; 16],
        #[serde(with = "b64vec")]
        ratchet_msg: Vec<u8>,
        signed: bool,
    },
}

/// What a received message meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// The handshake reached a state worth telling the user about.
    Connected {
        profile: Profile,
    },
    Text {
        envelope: Envelope,
        text: String,
        chain: ChainStatus,
    },
    ProfileUpdated {
        profile: Profile,
    },
    /// The peer asks us to rotate our receiving queues: the client creates
    /// new queues and calls [`Connection::start_rotation`].
    RotationRequested,
    /// A step of a queue rotation, nothing to show.
    RotationStep,
    /// The peer sends nothing more to our retired queues (rotation).
    PeerSwitched,
    /// The peer sends nothing more on the connection a re-key replaced.
    PeerLeftPrevious,
    /// A file offer (PROTOCOL.md §16): the client records it and fetches
    /// the file.
    File {
        envelope: Envelope,
        offer: Box<super::file::FileOffer>,
    },
    /// A delivery receipt (PROTOCOL.md §7.6): the peer's device stored
    /// these messages. The ids are the peer's word only: the client marks
    /// only messages it sent on this connection's group.
    Receipt {
        receipt: super::receipt::Receipt,
    },
    /// A device message (PROTOCOL.md §12), for the client to act on.
    Device {
        body: Vec<u8>,
        /// Its place in the sender's chain (§7.5).
        seq: u64,
    },
    /// An authentic envelope whose body is invalid (a profile update with a
    /// control character, a text that is not UTF-8): dropped, but part of
    /// the history.
    Refused {
        what: &'static str,
        reason: ProtoError,
    },
    /// A kind this version does not know; the user is told to upgrade.
    Unsupported {
        kind: u8,
    },
    /// A message from the peer fits neither ratchet: the two lost step (a
    /// state rolled back on either side, PROTOCOL.md §6.7). A resync offer
    /// is on its way; the user should hear why.
    ResyncStarted {
        reason: ProtoError,
    },
    /// The ratchet was restarted by a resync (§6.7); what it found.
    Resynced(super::resync::ResyncReport),
    /// Handshake bookkeeping with nothing to show.
    Nothing,
}

/// The result of processing one queue message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub incoming: Incoming,
    pub actions: Vec<Action>,
    /// Identifies the message across relays: record it to drop copies.
    pub digest: [u8; 32],
}

#[derive(Clone, Serialize, Deserialize, Debug)]
pub struct Connection {
    pub state: ConnState,
    /// The inviter's invitation secrets, kept only until the request arrives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invitation: Option<InviterSecrets>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<HandshakeKeys>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratchet: Option<Ratchet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret: Option<Secret32>,
    pub recv_queues: Vec<RecvQueue>,
    pub peer_queues: Vec<PeerQueue>,
    pub chain_out: ChainSender,
    pub chain_in: ChainReceiver,
    /// The protocol version both sides speak (0 until negotiated).
    pub version: u8,
    pub our_channel: Channel,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub their_channel: Option<Channel>,
    pub verified: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_profile: Option<Profile>,
    /// Our receiving queues being replaced (see `rotation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<super::rotation::Rotation>,
    /// New peer queues announced by the peer, with our fresh sender keys,
    /// used once the peer says they are secured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_rotation: Option<Vec<PeerQueue>>,
    /// Old receiving queues still drained until the peer has switched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired_queues: Vec<RecvQueue>,
    /// When our receiving queues last moved (or were created).
    #[serde(default)]
    pub last_rotated_ms: u64,
    /// This side made the invitation (as opposed to accepting one).
    #[serde(default)]
    pub inviter: bool,
    /// Our resync offer not yet accepted (§6.7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<super::resync::ResyncOffer>,
    /// The ratchet a resync replaced, still reading what the peer sent on
    /// it before it switched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Ratchet>,
    /// When the last resync completed (ms).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub last_resync_ms: u64,
    /// Our latest texts, to send again if a resync shows the peer lacks them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resend: Vec<super::resync::Sent>,
    /// Digest prefixes of the latest messages accepted: tells a copy (the
    /// same message through another relay) from a different message at a
    /// position already used, which only a forked sender makes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    recent: Vec<Digest16>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The first 16 bytes of a message digest, base64url in the store.
#[derive(Clone, Copy, Serialize, Deserialize, Debug, PartialEq, Eq)]
struct Digest16(#[serde(with = "b64")] [u8; 16]);

/// How many digests [`Connection::recent`] holds.
const RECENT_DIGESTS: usize = 32;

pub(crate) fn random_id<R: RngCore + CryptoRng>(rng: &mut R) -> [u8; 16] {
    let mut id = [0u8; 16];
    rng.fill_bytes(&mut id);
    id
}

impl Connection {
    /// Inviter: a new one-time contact invitation (kind 1) over our freshly
    /// created queues; re-key invitations seal one of these (§11).
    pub fn invite<R: RngCore + CryptoRng>(
        recv_queues: Vec<RecvQueue>,
        channel: Channel,
        rng: &mut R,
    ) -> (Connection, Invitation) {
        Self::invite_as(KIND_CONTACT, recv_queues, channel, rng)
    }

    /// Inviter: a device link (kind 3, PROTOCOL.md §12.2); show it with
    /// [`Invitation::to_device_link`].
    pub fn invite_device<R: RngCore + CryptoRng>(
        recv_queues: Vec<RecvQueue>,
        channel: Channel,
        rng: &mut R,
    ) -> (Connection, Invitation) {
        Self::invite_as(KIND_DEVICE, recv_queues, channel, rng)
    }

    fn invite_as<R: RngCore + CryptoRng>(
        kind: u8,
        recv_queues: Vec<RecvQueue>,
        channel: Channel,
        rng: &mut R,
    ) -> (Connection, Invitation) {
        let mut secrets = InviterSecrets::generate(rng);
        let invitation = Invitation {
            invitation_key: secrets.invitation.public(),
            ratchet_key: secrets.ratchet.public(),
            queues: recv_queues.iter().map(RecvQueue::send_queue).collect(),
        };
        // The transcript covers the invitation exactly as shown (§5.2).
        secrets.invitation_hash = invitation_hash(&invitation.encode_as(kind));
        let conn = Connection {
            invitation: Some(secrets),
            inviter: true,
            ..Connection::fresh(ConnState::Invited, recv_queues, channel)
        };
        (conn, invitation)
    }

    /// Joiner: accepts `invitation` with our reply queues. Returns the state
    /// and the connection request to send, unsigned, to every inviter queue.
    pub fn accept<R: RngCore + CryptoRng>(
        invitation: &Invitation,
        recv_queues: Vec<RecvQueue>,
        profile: &Profile,
        channel: Channel,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<(Connection, Vec<u8>), ProtoError> {
        Self::accept_as(
            KIND_CONTACT,
            invitation,
            recv_queues,
            profile,
            channel,
            now_ms,
            rng,
        )
    }

    /// Joiner of a device link (kind 3): as [`Connection::accept`].
    pub fn accept_device<R: RngCore + CryptoRng>(
        invitation: &Invitation,
        recv_queues: Vec<RecvQueue>,
        profile: &Profile,
        channel: Channel,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<(Connection, Vec<u8>), ProtoError> {
        Self::accept_as(
            KIND_DEVICE,
            invitation,
            recv_queues,
            profile,
            channel,
            now_ms,
            rng,
        )
    }

    fn accept_as<R: RngCore + CryptoRng>(
        kind: u8,
        invitation: &Invitation,
        recv_queues: Vec<RecvQueue>,
        profile: &Profile,
        channel: Channel,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<(Connection, Vec<u8>), ProtoError> {
        let agreement = joiner_agree(
            &invitation_hash(&invitation.encode_as(kind)),
            &invitation.invitation_key,
            &invitation.ratchet_key,
            rng,
        )?;
        let mut ratchet =
            Ratchet::init_initiator(&agreement.ratchet, &invitation.ratchet_key, rng)?;
        let peer_queues: Vec<PeerQueue> = invitation
            .queues
            .iter()
            .map(|q| PeerQueue {
                relay: q.relay.clone(),
                sender_id: q.sender_id,
                auth: Secret32::random(rng),
            })
            .collect();
        let hello = Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            channel,
            sender_keys: peer_queues
                .iter()
                .map(|q| q.signing_key().verifying_key().to_bytes())
                .collect(),
            reply_queues: recv_queues.iter().map(RecvQueue::send_queue).collect(),
            profile: profile.clone(),
        };
        let mut chain_out = ChainSender::default();
        // Before negotiation, the lowest version: any peer reads it.
        let env = chain_out.next(
            MIN_PROTOCOL_VERSION,
            Kind::Hello,
            random_id(rng),
            now_ms,
            hello.encode(),
        )?;
        let ratchet_msg = ratchet.encrypt(&env.encode()?, rng)?;
        let request = queue_msg::conn_request(
            &agreement.keys.joiner_identity,
            &agreement.keys.joiner_ephemeral,
            &ratchet_msg,
        );
        let conn = Connection {
            keys: Some(agreement.keys),
            ratchet: Some(ratchet),
            connection_secret: Some(agreement.connection_secret.clone()),
            peer_queues,
            chain_out,
            last_rotated_ms: now_ms,
            ..Connection::fresh(ConnState::Joining, recv_queues, channel)
        };
        Ok((conn, request))
    }

    /// A connection in `state` with nothing negotiated yet.
    fn fresh(state: ConnState, recv_queues: Vec<RecvQueue>, channel: Channel) -> Self {
        Connection {
            state,
            invitation: None,
            keys: None,
            ratchet: None,
            connection_secret: None,
            recv_queues,
            peer_queues: Vec::new(),
            chain_out: ChainSender::default(),
            chain_in: ChainReceiver::default(),
            version: 0,
            our_channel: channel,
            their_channel: None,
            verified: false,
            peer_profile: None,
            rotation: None,
            peer_rotation: None,
            retired_queues: Vec::new(),
            last_rotated_ms: 0,
            inviter: false,
            resync: None,
            previous: None,
            last_resync_ms: 0,
            resend: Vec::new(),
            recent: Vec::new(),
        }
    }

    /// Any of our receiving queues — current, being set up by a rotation, or
    /// retired and draining — by recipient id.
    pub fn recv_queue(&self, recipient_id: &Id) -> Option<&RecvQueue> {
        self.all_recv_queues()
            .find(|q| &q.recipient_id == recipient_id)
    }

    /// Every receiving queue that may hold messages for us.
    pub fn all_recv_queues(&self) -> impl Iterator<Item = &RecvQueue> {
        self.recv_queues
            .iter()
            .chain(self.rotation.iter().flat_map(|r| r.new_queues.iter()))
            .chain(self.retired_queues.iter())
    }

    pub(crate) fn secure_all(&self, queues: &[RecvQueue]) -> Vec<Action> {
        queues
            .iter()
            .map(|q| Action::Secure {
                recipient_id: q.recipient_id,
            })
            .collect()
    }

    /// Whether messages both ways are protected by a hybrid (X25519 and
    /// ML-KEM-768) key agreement: true once a round trip on the ratchet has
    /// happened (PROTOCOL.md §6.2); a connection request and the joiner's
    /// messages before the reply are X25519 only.
    pub fn post_quantum(&self) -> bool {
        self.state == ConnState::Connected
            && self.ratchet.as_ref().is_some_and(Ratchet::post_quantum)
    }

    /// The security code, once the handshake keys are known.
    pub fn security_code(&self) -> Option<String> {
        self.keys.as_ref().map(|k| security_code(&k.transcript()))
    }

    pub fn security_level(&self) -> SecurityLevel {
        if self.verified {
            SecurityLevel::Verified
        } else if self.our_channel == Channel::Screen && self.their_channel == Some(Channel::Screen)
        {
            SecurityLevel::InPerson
        } else {
            SecurityLevel::Shared
        }
    }

    /// Encrypts an envelope of `kind` with message id `id` for the peer.
    /// Only once connected: the caller keeps messages in its outbox until then.
    pub fn encrypt<R: RngCore + CryptoRng>(
        &mut self,
        kind: Kind,
        id: [u8; 16],
        body: Vec<u8>,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Action, ProtoError> {
        if self.state != ConnState::Connected {
            return Err(ProtoError::NotReady);
        }
        self.encrypt_any(kind, id, body, now_ms, true, rng)
    }

    pub(crate) fn encrypt_any<R: RngCore + CryptoRng>(
        &mut self,
        kind: Kind,
        id: [u8; 16],
        body: Vec<u8>,
        now_ms: u64,
        signed: bool,
        rng: &mut R,
    ) -> Result<Action, ProtoError> {
        let ratchet = self.ratchet.as_mut().ok_or(ProtoError::NotReady)?;
        let mut chain = self.chain_out.clone();
        let version = if self.version == 0 {
            MIN_PROTOCOL_VERSION
        } else {
            self.version
        };
        let env = chain.next(version, kind, id, now_ms, body)?;
        let ratchet_msg = ratchet.encrypt(&env.encode()?, rng)?;
        self.chain_out = chain;
        self.keep_for_resend(&env);
        Ok(Action::Deliver {
            envelope_id: id,
            ratchet_msg,
            signed,
        })
    }

    /// The bytes to upload to peer queue `i` for a ratchet message.
    pub fn queue_message<R: RngCore + CryptoRng>(
        &self,
        i: usize,
        ratchet_msg: &[u8],
        rng: &mut R,
    ) -> Result<Vec<u8>, ProtoError> {
        let secret = self
            .connection_secret
            .as_ref()
            .ok_or(ProtoError::NotReady)?;
        let q = self.peer_queues.get(i).ok_or(ProtoError::NotReady)?;
        queue_msg::seal_payload(secret, &q.sender_id, ratchet_msg, rng)
    }

    /// The digest identifying `message` (arrived on our queue `queue`) across
    /// relays, without touching any state; `None` if it does not open. Check
    /// it against the messages already processed before calling `receive`.
    pub fn digest_of(&self, queue: &Id, message: &[u8]) -> Option<[u8; 32]> {
        match queue_msg::parse(message).ok()? {
            QueueMessage::ConnRequest { ratchet_msg, .. } => Some(queue_msg::digest(&ratchet_msg)),
            QueueMessage::Message { sealed } => {
                let secret = self.connection_secret.as_ref()?;
                let q = self.recv_queue(queue)?;
                let ratchet_msg = queue_msg::open_message(secret, &q.sender_id, &sealed).ok()?;
                Some(queue_msg::digest(&ratchet_msg))
            }
            QueueMessage::Resync { kind, sealed } => {
                let secret = self.connection_secret.as_ref()?;
                let q = self.recv_queue(queue)?;
                let body = queue_msg::open_sealed(secret, &q.sender_id, kind, &sealed).ok()?;
                Some(queue_msg::digest(&body))
            }
        }
    }

    fn seen_recently(&self, digest: &[u8; 32]) -> bool {
        self.recent.iter().any(|d| d.0 == digest[..16])
    }

    fn note_digest(&mut self, digest: &[u8; 32]) {
        let mut d = [0u8; 16];
        d.copy_from_slice(&digest[..16]);
        self.recent.push(Digest16(d));
        if self.recent.len() > RECENT_DIGESTS {
            self.recent.remove(0);
        }
    }

    /// Processes a message that arrived on our receiving queue `queue`. On
    /// error nothing changed; the caller may drop the message. `profile` is
    /// ours, sent in the handshake reply if this message is a request.
    pub fn receive<R: RngCore + CryptoRng>(
        &mut self,
        queue: &Id,
        message: &[u8],
        profile: &Profile,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Received, ProtoError> {
        let mut next = self.clone();
        let r = next.receive_inner(queue, message, profile, now_ms, rng)?;
        *self = next;
        Ok(r)
    }

    fn receive_inner<R: RngCore + CryptoRng>(
        &mut self,
        queue: &Id,
        message: &[u8],
        profile: &Profile,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Received, ProtoError> {
        let sender_id = self.recv_queue(queue).ok_or(ProtoError::Decrypt)?.sender_id;
        match queue_msg::parse(message)? {
            QueueMessage::ConnRequest {
                joiner_identity,
                joiner_ephemeral,
                ratchet_msg,
            } => {
                let digest = queue_msg::digest(&ratchet_msg);
                if self.state != ConnState::Invited
                    || !self.recv_queues.iter().any(|q| &q.recipient_id == queue)
                {
                    // The same request through another relay is a copy; a
                    // different one means the one-time invitation was used
                    // twice, which the user should hear about.
                    let same = self.keys.is_some_and(|k| {
                        k.joiner_identity == joiner_identity
                            && k.joiner_ephemeral == joiner_ephemeral
                    });
                    let on_invitation_queue =
                        self.recv_queues.iter().any(|q| &q.recipient_id == queue);
                    return Err(if same || !self.inviter || !on_invitation_queue {
                        ProtoError::Duplicate
                    } else {
                        ProtoError::InvitationReused
                    });
                }
                self.accept_request(
                    &joiner_identity,
                    &joiner_ephemeral,
                    &ratchet_msg,
                    profile,
                    now_ms,
                    rng,
                )
                .map(|(incoming, actions)| Received {
                    incoming,
                    actions,
                    digest,
                })
            }
            QueueMessage::Message { sealed } => {
                let secret = self.connection_secret.as_ref().ok_or(ProtoError::Decrypt)?;
                let ratchet_msg = queue_msg::open_message(secret, &sender_id, &sealed)?;
                let digest = queue_msg::digest(&ratchet_msg);
                if self.seen_recently(&digest) {
                    return Err(ProtoError::Duplicate);
                }
                let (incoming, actions) = self.receive_ratchet_msg(&ratchet_msg, now_ms, rng)?;
                self.note_digest(&digest);
                Ok(Received {
                    incoming,
                    actions,
                    digest,
                })
            }
            QueueMessage::Resync { kind, sealed } => {
                let secret = self.connection_secret.as_ref().ok_or(ProtoError::Decrypt)?;
                let body = queue_msg::open_sealed(secret, &sender_id, kind, &sealed)?;
                if self.seen_recently(&queue_msg::digest(&body)) {
                    return Err(ProtoError::Duplicate);
                }
                let r = self.receive_resync(kind, &body, now_ms, rng)?;
                self.note_digest(&r.digest);
                Ok(r)
            }
        }
    }

    /// A ratchet message that the queue layer authenticated: the current
    /// ratchet, else the one a resync replaced (what the peer sent before
    /// it switched); if neither can place it, the ratchets lost step and a
    /// resync starts (§6.7).
    fn receive_ratchet_msg<R: RngCore + CryptoRng>(
        &mut self,
        ratchet_msg: &[u8],
        now_ms: u64,
        rng: &mut R,
    ) -> Result<(Incoming, Vec<Action>), ProtoError> {
        if self.resync.is_some() {
            // Our resync offer is out: what the old ratchet still carries
            // may extend a forked history, and taking it would move our head
            // past the fork. The peer sends its texts again from our head
            // once it has answered (§6.7).
            return Err(ProtoError::Duplicate);
        }
        let base = self.clone();
        let e = match self
            .decrypt_envelope(ratchet_msg, rng)
            .and_then(|env| self.apply(env, now_ms, rng))
        {
            Ok(r) => return Ok(r),
            Err(e) => e,
        };
        *self = base;
        if let Some(mut previous) = self.previous.clone() {
            if let Ok(padded) = previous.decrypt(ratchet_msg, rng) {
                // Sent before the peer switched: taken if it still fits the
                // chain, else its text came again on the new ratchet.
                let env = Envelope::decode(&padded)?;
                self.previous = Some(previous);
                return self.apply(env, now_ms, rng);
            }
        }
        if !self.lost_step(&e) {
            return Err(e);
        }
        let actions = self.start_resync(now_ms, rng)?;
        Ok((Incoming::ResyncStarted { reason: e }, actions))
    }

    fn decrypt_envelope<R: RngCore + CryptoRng>(
        &mut self,
        ratchet_msg: &[u8],
        rng: &mut R,
    ) -> Result<Envelope, ProtoError> {
        let ratchet = self.ratchet.as_mut().ok_or(ProtoError::Decrypt)?;
        let padded = ratchet.decrypt(ratchet_msg, rng)?;
        Envelope::decode(&padded)
    }

    fn accept_request<R: RngCore + CryptoRng>(
        &mut self,
        joiner_identity: &[u8; 32],
        joiner_ephemeral: &[u8; 32],
        ratchet_msg: &[u8],
        profile: &Profile,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<(Incoming, Vec<Action>), ProtoError> {
        let secrets = self.invitation.as_ref().ok_or(ProtoError::Decrypt)?;
        let agreement = secrets.agree(joiner_identity, joiner_ephemeral)?;
        let mut ratchet = Ratchet::init_responder(&agreement.ratchet, secrets.ratchet.clone());
        let padded = ratchet.decrypt(ratchet_msg, rng)?;
        let env = Envelope::decode(&padded)?;
        if env.kind != Kind::Hello {
            return Err(ProtoError::Decrypt);
        }
        self.chain_in.check(&env).map_err(chain_err)?;
        let hello = Hello::decode(&env.body)?;
        if hello.sender_keys.len() != self.recv_queues.len() {
            return Err(tern_wire::codec::CodecError::Invalid("one sender key per queue").into());
        }
        let version = negotiate(
            (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
            (hello.min_version, hello.max_version),
        )
        .ok_or(ProtoError::UnsupportedVersion(hello.min_version))?;
        self.chain_in.record(&env);
        self.invitation = None;
        self.keys = Some(agreement.keys);
        self.ratchet = Some(ratchet);
        self.connection_secret = Some(agreement.connection_secret);
        self.version = version;
        self.their_channel = Some(hello.channel);
        self.peer_profile = Some(hello.profile.clone());
        for (q, key) in self.recv_queues.iter_mut().zip(&hello.sender_keys) {
            q.secured_with = Some(*key);
        }
        self.peer_queues = hello
            .reply_queues
            .iter()
            .map(|q| PeerQueue {
                relay: q.relay.clone(),
                sender_id: q.sender_id,
                auth: Secret32::random(rng),
            })
            .collect();
        self.state = ConnState::Accepted;
        self.last_rotated_ms = now_ms;
        let mut actions = self.secure_all(&self.recv_queues);
        actions.push(self.reply_action(profile, now_ms, rng)?);
        Ok((Incoming::Nothing, actions))
    }

    fn reply_action<R: RngCore + CryptoRng>(
        &mut self,
        profile: &Profile,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Action, ProtoError> {
        let reply = HelloReply {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            channel: self.our_channel,
            sender_keys: self
                .peer_queues
                .iter()
                .map(|q| q.signing_key().verifying_key().to_bytes())
                .collect(),
            profile: profile.clone(),
        };
        let id = random_id(rng);
        self.encrypt_any(Kind::HelloReply, id, reply.encode(), now_ms, false, rng)
    }

    fn apply<R: RngCore + CryptoRng>(
        &mut self,
        env: Envelope,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<(Incoming, Vec<Action>), ProtoError> {
        let chain = self.chain_in.check(&env).map_err(chain_err)?;
        // The joiner sends its own messages only once connected, so any of
        // them proves the handshake completed even if its Confirm was lost
        // or is late: treat it as the confirmation rather than drop it.
        if self.state == ConnState::Accepted
            && !matches!(env.kind, Kind::Hello | Kind::HelloReply | Kind::Confirm)
        {
            self.state = ConnState::Connected;
        }
        let result = match (self.state, env.kind) {
            (ConnState::Joining, Kind::HelloReply) => {
                let reply = HelloReply::decode(&env.body)?;
                if reply.sender_keys.len() != self.recv_queues.len() {
                    return Err(
                        tern_wire::codec::CodecError::Invalid("one sender key per queue").into(),
                    );
                }
                self.version = negotiate(
                    (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
                    (reply.min_version, reply.max_version),
                )
                .ok_or(ProtoError::UnsupportedVersion(reply.min_version))?;
                for (q, key) in self.recv_queues.iter_mut().zip(&reply.sender_keys) {
                    q.secured_with = Some(*key);
                }
                self.their_channel = Some(reply.channel);
                self.peer_profile = Some(reply.profile.clone());
                self.state = ConnState::Connected;
                let mut actions = self.secure_all(&self.recv_queues);
                let id = random_id(rng);
                actions.push(self.encrypt_any(Kind::Confirm, id, Vec::new(), now_ms, true, rng)?);
                (
                    Incoming::Connected {
                        profile: reply.profile,
                    },
                    actions,
                )
            }
            (ConnState::Accepted, Kind::Confirm) => {
                self.state = ConnState::Connected;
                let profile = self.peer_profile.clone().unwrap_or_default();
                (Incoming::Connected { profile }, Vec::new())
            }
            // An authentic envelope whose body breaks its rules is the
            // peer's doing, not a relay's: refused, but it stays part of the
            // history (recorded in the chain), so what follows links up.
            (ConnState::Connected, Kind::Text) => match String::from_utf8(env.body.clone()) {
                Ok(text) => (
                    Incoming::Text {
                        envelope: env.clone(),
                        text,
                        chain,
                    },
                    Vec::new(),
                ),
                Err(_) => (
                    Incoming::Refused {
                        what: "message",
                        reason: tern_wire::codec::CodecError::Invalid("UTF-8 text").into(),
                    },
                    Vec::new(),
                ),
            },
            (ConnState::Connected, Kind::Profile) => match Profile::from_bytes(&env.body) {
                Ok(profile) => {
                    self.peer_profile = Some(profile.clone());
                    (Incoming::ProfileUpdated { profile }, Vec::new())
                }
                Err(reason) => (
                    Incoming::Refused {
                        what: "profile update",
                        reason,
                    },
                    Vec::new(),
                ),
            },
            (ConnState::Connected, Kind::Control) => self.apply_control(&env.body, now_ms, rng)?,
            (ConnState::Connected, Kind::Receipt) => {
                match super::receipt::Receipt::decode(&env.body) {
                    Ok(receipt) => (Incoming::Receipt { receipt }, Vec::new()),
                    Err(reason) => (
                        Incoming::Refused {
                            what: "delivery receipt",
                            reason,
                        },
                        Vec::new(),
                    ),
                }
            }
            (ConnState::Connected, Kind::Device) => (
                Incoming::Device {
                    body: env.body.clone(),
                    seq: env.seq,
                },
                Vec::new(),
            ),
            (ConnState::Connected, Kind::File) => match super::file::FileOffer::decode(&env.body) {
                Ok(offer) => (
                    Incoming::File {
                        envelope: env.clone(),
                        offer: Box::new(offer),
                    },
                    Vec::new(),
                ),
                Err(reason) => (
                    Incoming::Refused {
                        what: "file offer",
                        reason,
                    },
                    Vec::new(),
                ),
            },
            (ConnState::Connected, Kind::Unknown(k)) => {
                (Incoming::Unsupported { kind: k }, Vec::new())
            }
            // A handshake message out of place: authentic (it decrypted) but
            // meaningless now, e.g. a late copy. Ignore it.
            _ => (Incoming::Nothing, Vec::new()),
        };
        self.chain_in.record(&env);
        Ok(result)
    }
}

pub(crate) fn chain_err(e: ChainError) -> ProtoError {
    match e {
        ChainError::Duplicate => ProtoError::Duplicate,
        ChainError::Mismatch => ProtoError::ChainMismatch,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE";

    pub(crate) fn queues(rng: &mut StdRng, n: usize, host: u8) -> Vec<RecvQueue> {
        (0..n)
            .map(|i| {
                let keys = QueueKeys::generate(rng);
                let relay_dh = DhKeyPair::generate(rng);
                let relay: RelayAddress = format!("tern://{KEY}@10.0.{host}.{i}:5223")
                    .parse()
                    .unwrap();
                RecvQueue::created(
                    relay,
                    &keys,
                    [16 * host + i as u8 + 1; 16],
                    [16 * host + i as u8 + 9; 16],
                    &relay_dh.public(),
                )
                .unwrap()
            })
            .collect()
    }

    pub(crate) fn profile(name: &str) -> Profile {
        Profile {
            name: name.into(),
            ..Profile::default()
        }
    }

    fn deliveries(actions: &[Action]) -> Vec<(Vec<u8>, bool)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Deliver {
                    ratchet_msg,
                    signed,
                    ..
                } => Some((ratchet_msg.clone(), *signed)),
                _ => None,
            })
            .collect()
    }

    /// Runs a whole handshake; returns (inviter, joiner).
    pub(crate) fn connect(rng: &mut StdRng) -> (Connection, Connection) {
        let (mut alice, inv) = Connection::invite(queues(rng, 2, 1), Channel::Screen, rng);
        let inv = Invitation::from_link(&inv.to_link()).unwrap();
        let (mut bob, request) = Connection::accept(
            &inv,
            queues(rng, 3, 2),
            &profile("bob"),
            Channel::Screen,
            1,
            rng,
        )
        .unwrap();
        assert_eq!(bob.state, ConnState::Joining);
        // The request arrives on both of Alice's queues; the second is a copy.
        let (a0, a1) = (
            alice.recv_queues[0].recipient_id,
            alice.recv_queues[1].recipient_id,
        );
        let r = alice
            .receive(&a0, &request, &profile("alice"), 2, rng)
            .unwrap();
        assert_eq!(
            alice.receive(&a1, &request, &profile("alice"), 2, rng),
            Err(ProtoError::Duplicate)
        );
        assert_eq!(alice.state, ConnState::Accepted);
        assert_eq!(
            r.actions[..2],
            [
                Action::Secure { recipient_id: a0 },
                Action::Secure { recipient_id: a1 }
            ]
        );
        let d = deliveries(&r.actions);
        assert_eq!(d.len(), 1);
        assert!(!d[0].1, "the reply to a fresh queue is unsigned");
        assert_eq!(alice.peer_queues.len(), 3);
        assert_eq!(alice.peer_profile.as_ref().unwrap().name, "bob");
        // The reply goes to Bob's queue 2 (any of them).
        let up = alice.queue_message(2, &d[0].0, rng).unwrap();
        let b2 = bob.recv_queues[2].recipient_id;
        let r = bob.receive(&b2, &up, &profile("bob"), 3, rng).unwrap();
        assert_eq!(
            r.incoming,
            Incoming::Connected {
                profile: profile("alice")
            }
        );
        assert_eq!(bob.state, ConnState::Connected);
        let d = deliveries(&r.actions);
        assert!(d[0].1, "the confirmation is signed");
        let up = bob.queue_message(0, &d[0].0, rng).unwrap();
        let r = alice.receive(&a0, &up, &profile("alice"), 4, rng).unwrap();
        assert!(matches!(r.incoming, Incoming::Connected { .. }));
        assert_eq!(alice.state, ConnState::Connected);
        (alice, bob)
    }

    #[test]
    fn handshake_then_messages_both_ways() {
        let mut rng = StdRng::seed_from_u64(1);
        let (mut alice, mut bob) = connect(&mut rng);
        assert_eq!(alice.security_code(), bob.security_code());
        assert_eq!(alice.security_level(), SecurityLevel::InPerson);
        for i in 0..3 {
            let Action::Deliver { ratchet_msg, .. } = alice
                .encrypt(
                    Kind::Text,
                    [i; 16],
                    format!("hi {i}").into_bytes(),
                    10,
                    &mut rng,
                )
                .unwrap()
            else {
                panic!()
            };
            let up = alice.queue_message(1, &ratchet_msg, &mut rng).unwrap();
            let r = bob
                .receive(
                    &bob.recv_queues[1].recipient_id.clone(),
                    &up,
                    &profile("bob"),
                    11,
                    &mut rng,
                )
                .unwrap();
            let Incoming::Text { text, chain, .. } = r.incoming else {
                panic!()
            };
            assert_eq!(text, format!("hi {i}"));
            assert_eq!(chain, ChainStatus::InOrder);
            // The same message through another relay is a duplicate.
            let copy = alice.queue_message(2, &ratchet_msg, &mut rng).unwrap();
            let b2 = bob.recv_queues[2].recipient_id;
            assert_eq!(
                bob.receive(&b2, &copy, &profile("bob"), 11, &mut rng),
                Err(ProtoError::Duplicate)
            );
        }
        let Action::Deliver { ratchet_msg, .. } = bob
            .encrypt(Kind::Text, [9; 16], b"back".to_vec(), 12, &mut rng)
            .unwrap()
        else {
            panic!()
        };
        let up = bob.queue_message(0, &ratchet_msg, &mut rng).unwrap();
        let a0 = alice.recv_queues[0].recipient_id;
        let r = alice
            .receive(&a0, &up, &profile("alice"), 13, &mut rng)
            .unwrap();
        assert!(matches!(r.incoming, Incoming::Text { ref text, .. } if text == "back"));
    }

    #[test]
    fn messages_on_the_wrong_queue_or_tampered_change_nothing() {
        let mut rng = StdRng::seed_from_u64(2);
        let (mut alice, mut bob) = connect(&mut rng);
        let Action::Deliver { ratchet_msg, .. } = alice
            .encrypt(Kind::Text, [1; 16], b"x".to_vec(), 10, &mut rng)
            .unwrap()
        else {
            panic!()
        };
        let up = alice.queue_message(0, &ratchet_msg, &mut rng).unwrap();
        let before = serde_json::to_string(&bob).unwrap();
        let (b0, b1) = (
            bob.recv_queues[0].recipient_id,
            bob.recv_queues[1].recipient_id,
        );
        // Queue layer keyed by sender id: queue 1 cannot open queue 0's upload.
        assert_eq!(
            bob.receive(&b1, &up, &profile("bob"), 0, &mut rng),
            Err(ProtoError::Decrypt)
        );
        let mut bad = up.clone();
        bad[500] ^= 1;
        assert!(bob
            .receive(&b0, &bad, &profile("bob"), 0, &mut rng)
            .is_err());
        assert_eq!(serde_json::to_string(&bob).unwrap(), before);
        assert!(bob.receive(&b0, &up, &profile("bob"), 0, &mut rng).is_ok());
    }

    /// Issue 14 item 5: the joiner was given the inviter's invitation with
    /// one queue swapped for another relay's. Its connection request must
    /// not open at the inviter (and the invitation stays unused); a device
    /// link taken for a contact invitation fails the same way.
    #[test]
    fn a_changed_invitation_fails_the_handshake() {
        let mut rng = StdRng::seed_from_u64(5);
        let (mut alice, inv) =
            Connection::invite(queues(&mut rng, 2, 1), Channel::Shared, &mut rng);
        let mut swapped = inv.clone();
        swapped.queues[1] = queues(&mut rng, 1, 7)[0].send_queue();
        let (_, request) = Connection::accept(
            &swapped,
            queues(&mut rng, 1, 2),
            &profile("bob"),
            Channel::Shared,
            1,
            &mut rng,
        )
        .unwrap();
        let a0 = alice.recv_queues[0].recipient_id;
        let before = serde_json::to_string(&alice).unwrap();
        assert_eq!(
            alice
                .receive(&a0, &request, &profile("alice"), 2, &mut rng)
                .map(|r| r.incoming),
            Err(ProtoError::Decrypt)
        );
        assert_eq!(serde_json::to_string(&alice).unwrap(), before);
        // The same invitation under the device-link kind: refused too.
        let (_, request) = Connection::accept_device(
            &inv,
            queues(&mut rng, 1, 2),
            &profile("bob"),
            Channel::Shared,
            1,
            &mut rng,
        )
        .unwrap();
        assert_eq!(
            alice
                .receive(&a0, &request, &profile("alice"), 2, &mut rng)
                .map(|r| r.incoming),
            Err(ProtoError::Decrypt)
        );
        // The invitation as made still works.
        let (_, request) = Connection::accept(
            &inv,
            queues(&mut rng, 1, 2),
            &profile("bob"),
            Channel::Shared,
            1,
            &mut rng,
        )
        .unwrap();
        assert!(alice
            .receive(&a0, &request, &profile("alice"), 2, &mut rng)
            .is_ok());
        assert_eq!(alice.state, ConnState::Accepted);
    }

    #[test]
    fn cannot_send_before_connected() {
        let mut rng = StdRng::seed_from_u64(3);
        let (mut alice, _) = Connection::invite(queues(&mut rng, 1, 1), Channel::Shared, &mut rng);
        assert_eq!(
            alice.encrypt(Kind::Text, [0; 16], vec![], 0, &mut rng),
            Err(ProtoError::NotReady)
        );
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut rng = StdRng::seed_from_u64(4);
        let (alice, bob) = connect(&mut rng);
        for c in [alice, bob] {
            let json = serde_json::to_string(&c).unwrap();
            let back: Connection = serde_json::from_str(&json).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), json);
        }
    }
}
