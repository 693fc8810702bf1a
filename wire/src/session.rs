//! The relay session: one forward-secret, post-quantum hybrid key agreement
//! per connection, then counter-nonce AEAD frames (PROTOCOL.md §3.2).
//!
//! The handshake is the Noise pattern `NKpsk2` (Noise_NKpsk2_25519_ChaChaPoly_SHA256,
//! run by the `snow` crate) with an ML-KEM-768 shared secret as its PSK:
//!
//! ```text
//!   <- s                                        relay key, pinned in the address
//!   ...
//!   -> e, es           payload: ClientHello (versions, ML-KEM encapsulation key)
//!   <- e, ee, psk      payload: ServerHello (version, relay policy)
//!      psk = ML-KEM-768 shared secret, its ciphertext sent in front of message 2
//! ```
//!
//! `es` authenticates the relay (only the holder of the pinned key can finish
//! the handshake), `ee` gives forward secrecy, and the KEM secret, mixed in
//! as the PSK, keeps recorded traffic closed against a quantum computer: the
//! transport keys depend on `ee`, `es` and the KEM secret, so they hold if
//! either X25519 or ML-KEM holds. The relay's key stays a small classical key
//! (authentication need not be post-quantum; confidentiality must). The
//! ciphertext travels outside the Noise message because the PSK must be
//! known before message 2 is read; a changed ciphertext gives another secret
//! and message 2 then fails to decrypt, so it needs no other protection.
//!
//! What message 1's payload is protected by: `es` only (the relay's static
//! key), so it carries nothing but versions and the public KEM key; no
//! command rides in it.
//!
//! After the handshake every frame is one Noise transport message; the
//! counter nonces of the transport refuse replayed, reordered, dropped or
//! altered frames, and any failure ends the session.

use ml_kem::kem::{Decapsulate, Encapsulate};
use ml_kem::{EncodedSizeUser, KemCore, MlKem768};
use rand_core::{CryptoRng, RngCore};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::codec::{CodecError, Reader, Writer};
use crate::command::{RelayInfo, WireError, RELAY_INFO_LEN, SESSION_HASH_LEN};
use crate::frame::MAX_FRAME_LEN;

/// The Noise protocol name: fixes the pattern and every primitive.
pub const NOISE_PARAMS: &str = "Noise_NKpsk2_25519_ChaChaPoly_SHA256";
/// The Noise prologue: binds the handshake to this protocol and version.
pub const PROLOGUE: &[u8] = b"tern/v2 relay session";
/// The only session version this implementation speaks.
pub const SESSION_VERSION: u8 = 2;
/// ML-KEM-768 encapsulation key length.
pub const KEM_EK_LEN: usize = 1184;
/// ML-KEM-768 ciphertext length.
pub const KEM_CT_LEN: usize = 1088;
/// The AEAD tag of every Noise message.
pub const TAG_LEN: usize = 16;
/// ClientHello: min version, max version, encapsulation key.
pub const CLIENT_HELLO_LEN: usize = 2 + KEM_EK_LEN;
/// Message 1: `e`, then the encrypted ClientHello.
pub const MSG1_LEN: usize = 32 + CLIENT_HELLO_LEN + TAG_LEN;
/// ServerHello: version, then the relay's policy.
pub const SERVER_HELLO_LEN: usize = 1 + RELAY_INFO_LEN;
/// Message 2 as sent: the KEM ciphertext, `e`, the encrypted ServerHello.
pub const MSG2_LEN: usize = KEM_CT_LEN + 32 + SERVER_HELLO_LEN + TAG_LEN;
/// Longest transport message (a full frame with its tag).
pub const MAX_MESSAGE_LEN: usize = MAX_FRAME_LEN + TAG_LEN;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    #[error("the relay's key in the address is not a usable X25519 key")]
    BadKey,
    #[error("the handshake message has the wrong length")]
    Length,
    #[error("the handshake did not authenticate: wrong relay key, or tampering in between")]
    Handshake,
    #[error("no session version in common (we speak {SESSION_VERSION}, the peer {0}..={1})")]
    Version(u8, u8),
    #[error("malformed handshake payload: {0}")]
    Malformed(#[from] WireError),
    #[error("a frame did not decrypt: replayed, reordered, truncated or altered")]
    Frame,
    #[error("a frame is longer than a session allows")]
    TooLong,
}

impl From<CodecError> for SessionError {
    fn from(e: CodecError) -> Self {
        SessionError::Malformed(e.into())
    }
}

fn builder() -> snow::Builder<'static> {
    snow::Builder::new(NOISE_PARAMS.parse().expect("a valid Noise protocol name"))
}

/// The client half of a handshake in progress.
pub struct ClientHandshake {
    noise: snow::HandshakeState,
    dk: <MlKem768 as KemCore>::DecapsulationKey,
}

/// The relay half, between reading message 1 and sending message 2 (which
/// [`ServerHandshake::respond`] does in one step).
pub struct ServerHandshake;

/// What the client offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientHello {
    pub min_version: u8,
    pub max_version: u8,
}

/// Deterministic inputs, for test vectors only: the ephemeral X25519 secret
/// and the ML-KEM randomness (`d || z` for key generation on the client,
/// `m` for encapsulation on the relay).
#[doc(hidden)]
pub struct Fixed<'a> {
    pub ephemeral: &'a [u8; 32],
    pub kem: &'a [u8],
}

impl ClientHandshake {
    /// Starts a session with the relay whose identity key is `relay_key`;
    /// returns the state and message 1.
    pub fn start<R: RngCore + CryptoRng>(
        relay_key: &[u8; 32],
        rng: &mut R,
    ) -> Result<(Self, Vec<u8>), SessionError> {
        let (dk, ek) = MlKem768::generate(rng);
        let noise = builder()
            .prologue(PROLOGUE)
            .and_then(|b| b.remote_public_key(relay_key))
            .and_then(|b| b.build_initiator())
            .map_err(|_| SessionError::BadKey)?;
        Self::first_message(noise, dk, &ek.as_bytes())
    }

    #[doc(hidden)]
    pub fn start_fixed(
        relay_key: &[u8; 32],
        fixed: Fixed<'_>,
    ) -> Result<(Self, Vec<u8>), SessionError> {
        let d = ml_kem::B32::try_from(&fixed.kem[..32]).map_err(|_| SessionError::Length)?;
        let z = ml_kem::B32::try_from(&fixed.kem[32..64]).map_err(|_| SessionError::Length)?;
        let (dk, ek) = MlKem768::generate_deterministic(&d, &z);
        let noise = builder()
            .prologue(PROLOGUE)
            .and_then(|b| b.remote_public_key(relay_key))
            .map(|b| b.fixed_ephemeral_key_for_testing_only(fixed.ephemeral))
            .and_then(|b| b.build_initiator())
            .map_err(|_| SessionError::BadKey)?;
        Self::first_message(noise, dk, &ek.as_bytes())
    }

    fn first_message(
        mut noise: snow::HandshakeState,
        dk: <MlKem768 as KemCore>::DecapsulationKey,
        ek: &[u8],
    ) -> Result<(Self, Vec<u8>), SessionError> {
        let mut hello = Writer::with_capacity(CLIENT_HELLO_LEN);
        hello.u8(SESSION_VERSION).u8(SESSION_VERSION).bytes(ek);
        let mut msg = vec![0u8; MSG1_LEN];
        let n = noise
            .write_message(&hello.into_vec(), &mut msg)
            .map_err(|_| SessionError::BadKey)?;
        debug_assert_eq!(n, MSG1_LEN);
        Ok((Self { noise, dk }, msg))
    }

    /// Reads message 2: the session is up, and the relay's policy known.
    pub fn finish(mut self, msg2: &[u8]) -> Result<(Session, RelayInfo), SessionError> {
        if msg2.len() != MSG2_LEN {
            return Err(SessionError::Length);
        }
        let (ct, noise_msg) = msg2.split_at(KEM_CT_LEN);
        let ct = ml_kem::Ciphertext::<MlKem768>::try_from(ct).map_err(|_| SessionError::Length)?;
        // ML-KEM decapsulation never fails: a changed ciphertext gives an
        // unrelated secret, and message 2 below then fails to decrypt.
        let ss = Zeroizing::new(<[u8; 32]>::from(
            self.dk
                .decapsulate(&ct)
                .map_err(|_| SessionError::Handshake)?,
        ));
        self.noise
            .set_psk(2, &ss[..])
            .map_err(|_| SessionError::Handshake)?;
        let mut payload = vec![0u8; SERVER_HELLO_LEN];
        let n = self
            .noise
            .read_message(noise_msg, &mut payload)
            .map_err(|_| SessionError::Handshake)?;
        let mut r = Reader::new(&payload[..n]);
        let version = r.u8()?;
        let info = RelayInfo::decode(&mut r)?;
        r.finish()?;
        if version != SESSION_VERSION {
            return Err(SessionError::Version(version, version));
        }
        Session::from_handshake(self.noise).map(|s| (s, info))
    }
}

impl ServerHandshake {
    /// Reads message 1 with the relay's identity secret and answers it:
    /// returns the session, message 2 and what the client offered.
    pub fn respond<R: RngCore + CryptoRng>(
        identity_secret: &[u8; 32],
        msg1: &[u8],
        info: &RelayInfo,
        rng: &mut R,
    ) -> Result<(Session, Vec<u8>, ClientHello), SessionError> {
        let noise = builder()
            .prologue(PROLOGUE)
            .and_then(|b| b.local_private_key(identity_secret))
            .and_then(|b| b.build_responder())
            .map_err(|_| SessionError::BadKey)?;
        Self::respond_with(noise, msg1, info, |ek| ek.encapsulate(rng).map_err(|_| ()))
    }

    #[doc(hidden)]
    pub fn respond_fixed(
        identity_secret: &[u8; 32],
        msg1: &[u8],
        info: &RelayInfo,
        fixed: Fixed<'_>,
    ) -> Result<(Session, Vec<u8>, ClientHello), SessionError> {
        use ml_kem::EncapsulateDeterministic;
        let m = ml_kem::B32::try_from(&fixed.kem[..32]).map_err(|_| SessionError::Length)?;
        let noise = builder()
            .prologue(PROLOGUE)
            .and_then(|b| b.local_private_key(identity_secret))
            .map(|b| b.fixed_ephemeral_key_for_testing_only(fixed.ephemeral))
            .and_then(|b| b.build_responder())
            .map_err(|_| SessionError::BadKey)?;
        Self::respond_with(noise, msg1, info, |ek| {
            ek.encapsulate_deterministic(&m).map_err(|_| ())
        })
    }

    fn respond_with(
        mut noise: snow::HandshakeState,
        msg1: &[u8],
        info: &RelayInfo,
        encapsulate: impl FnOnce(
            &<MlKem768 as KemCore>::EncapsulationKey,
        ) -> Result<
            (ml_kem::Ciphertext<MlKem768>, ml_kem::SharedKey<MlKem768>),
            (),
        >,
    ) -> Result<(Session, Vec<u8>, ClientHello), SessionError> {
        if msg1.len() != MSG1_LEN {
            return Err(SessionError::Length);
        }
        let mut payload = vec![0u8; CLIENT_HELLO_LEN];
        let n = noise
            .read_message(msg1, &mut payload)
            .map_err(|_| SessionError::Handshake)?;
        let mut r = Reader::new(&payload[..n]);
        let hello = ClientHello {
            min_version: r.u8()?,
            max_version: r.u8()?,
        };
        let ek_bytes = r.bytes(KEM_EK_LEN)?;
        r.finish()?;
        if !(hello.min_version..=hello.max_version).contains(&SESSION_VERSION) {
            return Err(SessionError::Version(hello.min_version, hello.max_version));
        }
        let ek_array =
            ml_kem::Encoded::<<MlKem768 as KemCore>::EncapsulationKey>::try_from(ek_bytes)
                .map_err(|_| SessionError::Length)?;
        let ek = <MlKem768 as KemCore>::EncapsulationKey::from_bytes(&ek_array);
        let (ct, ss) = encapsulate(&ek).map_err(|()| SessionError::Handshake)?;
        let ss = Zeroizing::new(<[u8; 32]>::from(ss));
        noise
            .set_psk(2, &ss[..])
            .map_err(|_| SessionError::Handshake)?;
        let mut hello_out = Writer::with_capacity(SERVER_HELLO_LEN);
        hello_out.u8(SESSION_VERSION);
        info.encode(&mut hello_out);
        let mut msg = vec![0u8; MSG2_LEN];
        msg[..KEM_CT_LEN].copy_from_slice(&ct);
        let n = noise
            .write_message(&hello_out.into_vec(), &mut msg[KEM_CT_LEN..])
            .map_err(|_| SessionError::Handshake)?;
        debug_assert_eq!(KEM_CT_LEN + n, MSG2_LEN);
        let session = Session::from_handshake(noise)?;
        Ok((session, msg, hello))
    }
}

/// An established session: seals outgoing frames, opens incoming ones.
pub struct Session {
    transport: snow::TransportState,
    hash: [u8; SESSION_HASH_LEN],
}

impl Session {
    fn from_handshake(noise: snow::HandshakeState) -> Result<Self, SessionError> {
        let hash: [u8; SESSION_HASH_LEN] = noise
            .get_handshake_hash()
            .try_into()
            .map_err(|_| SessionError::Handshake)?;
        let transport = noise
            .into_transport_mode()
            .map_err(|_| SessionError::Handshake)?;
        Ok(Self { transport, hash })
    }

    /// The handshake hash: names this session; every signed command is bound
    /// to it.
    pub fn hash(&self) -> &[u8; SESSION_HASH_LEN] {
        &self.hash
    }

    /// Encrypts one frame plaintext into one transport message.
    pub fn seal(&mut self, frame: &[u8]) -> Result<Vec<u8>, SessionError> {
        if frame.len() > MAX_FRAME_LEN {
            return Err(SessionError::TooLong);
        }
        let mut out = vec![0u8; frame.len() + TAG_LEN];
        let n = self
            .transport
            .write_message(frame, &mut out)
            .map_err(|_| SessionError::TooLong)?;
        out.truncate(n);
        Ok(out)
    }

    /// Decrypts one transport message into its frame plaintext. Any failure
    /// is final: the caller ends the session.
    pub fn open(&mut self, message: &[u8]) -> Result<Vec<u8>, SessionError> {
        if message.len() > MAX_MESSAGE_LEN || message.len() < TAG_LEN {
            return Err(SessionError::TooLong);
        }
        let mut out = vec![0u8; message.len() - TAG_LEN];
        let n = self
            .transport
            .read_message(message, &mut out)
            .map_err(|_| SessionError::Frame)?;
        out.truncate(n);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;
    use x25519_dalek::{PublicKey, StaticSecret};

    fn info() -> RelayInfo {
        RelayInfo {
            min_version: 2,
            max_version: 2,
            open: true,
            max_pending: 1000,
            ttl_secs: 3600,
            max_window: 64,
            max_subscriptions: 4096,
            unsecured_ttl_secs: 86_400,
        }
    }

    fn relay() -> ([u8; 32], [u8; 32]) {
        let s = StaticSecret::random_from_rng(OsRng);
        (s.to_bytes(), PublicKey::from(&s).to_bytes())
    }

    #[test]
    fn handshake_then_frames_both_ways() {
        let (secret, public) = relay();
        let (client, msg1) = ClientHandshake::start(&public, &mut OsRng).unwrap();
        assert_eq!(msg1.len(), MSG1_LEN);
        let (mut server, msg2, hello) =
            ServerHandshake::respond(&secret, &msg1, &info(), &mut OsRng).unwrap();
        assert_eq!(hello.max_version, SESSION_VERSION);
        assert_eq!(msg2.len(), MSG2_LEN);
        let (mut client, got) = client.finish(&msg2).unwrap();
        assert_eq!(got, info());
        assert_eq!(client.hash(), server.hash());
        for i in 0..3u8 {
            let m = client.seal(&[i; 1024]).unwrap();
            assert_eq!(server.open(&m).unwrap(), vec![i; 1024]);
            let m = server.seal(&[i + 10; 2048]).unwrap();
            assert_eq!(client.open(&m).unwrap(), vec![i + 10; 2048]);
        }
    }

    #[test]
    fn wrong_relay_key_cannot_answer() {
        let (_, public) = relay();
        let (other_secret, _) = relay();
        let (_client, msg1) = ClientHandshake::start(&public, &mut OsRng).unwrap();
        assert_eq!(
            ServerHandshake::respond(&other_secret, &msg1, &info(), &mut OsRng).err(),
            Some(SessionError::Handshake)
        );
    }

    #[test]
    fn a_changed_kem_ciphertext_or_message_fails_the_handshake() {
        let (secret, public) = relay();
        for at in [0, KEM_CT_LEN - 1, KEM_CT_LEN, KEM_CT_LEN + 40, MSG2_LEN - 1] {
            let (client, msg1) = ClientHandshake::start(&public, &mut OsRng).unwrap();
            let (_, mut msg2, _) =
                ServerHandshake::respond(&secret, &msg1, &info(), &mut OsRng).unwrap();
            msg2[at] ^= 1;
            assert!(client.finish(&msg2).is_err(), "flip at {at}");
        }
        let (_client, mut msg1) = ClientHandshake::start(&public, &mut OsRng).unwrap();
        msg1[100] ^= 1;
        assert!(ServerHandshake::respond(&secret, &msg1, &info(), &mut OsRng).is_err());
    }

    #[test]
    fn replayed_reordered_or_flipped_frames_are_refused() {
        let (secret, public) = relay();
        let (client, msg1) = ClientHandshake::start(&public, &mut OsRng).unwrap();
        let (mut server, msg2, _) =
            ServerHandshake::respond(&secret, &msg1, &info(), &mut OsRng).unwrap();
        let (mut client, _) = client.finish(&msg2).unwrap();
        let a = client.seal(&[1; 1024]).unwrap();
        let b = client.seal(&[2; 1024]).unwrap();
        assert_eq!(server.open(&b), Err(SessionError::Frame), "reordered");
        // A failed frame changes nothing: the right one still opens.
        assert!(server.open(&a).is_ok());
        assert_eq!(server.open(&a), Err(SessionError::Frame), "replayed");
        let mut c = client.seal(&[3; 1024]).unwrap();
        c[7] ^= 1;
        assert_eq!(server.open(&b).unwrap(), vec![2; 1024]);
        assert_eq!(server.open(&c), Err(SessionError::Frame), "flipped");
    }

    #[test]
    fn fixed_inputs_are_deterministic() {
        let (secret, public) = relay();
        let run = || {
            let (c, m1) = ClientHandshake::start_fixed(
                &public,
                Fixed {
                    ephemeral: &[7; 32],
                    kem: &[8; 64],
                },
            )
            .unwrap();
            let (s, m2, _) = ServerHandshake::respond_fixed(
                &secret,
                &m1,
                &info(),
                Fixed {
                    ephemeral: &[9; 32],
                    kem: &[10; 32],
                },
            )
            .unwrap();
            let (c, _) = c.finish(&m2).unwrap();
            assert_eq!(c.hash(), s.hash());
            (m1, m2, *c.hash())
        };
        assert_eq!(run(), run());
    }
}
