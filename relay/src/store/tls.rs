//! TLS to the database, as PaaS PostgreSQL add-ons require: rustls (ring),
//! the stack the rest of tern uses.
//!
//! `sslmode` as libpq reads it, in a `postgres://` URL:
//! - `prefer` (the default) and `require`: encrypted whenever the server
//!   offers TLS, and always with `require`. As with libpq, the server's
//!   certificate is not checked (managed databases commonly present ones no
//!   public root signs): this keeps the traffic from passive observers, not
//!   from an active one between the relay and its database.
//! - `verify-ca`: TLS required, and the server's chain must lead to a root
//!   in `sslrootcert` (a PEM file; `system`, or no `sslrootcert`, means
//!   Mozilla's root set);
//! - `verify-full`: that, and the certificate must name the host connected
//!   to (a DNS name or IP address in its subjectAltName).
//!
//! tokio-postgres knows only `disable`, `prefer` and `require`, and refuses
//! `sslrootcert`: both are taken out of the URL here, and the verifying
//! modes become `require` plus a verifying connector. The key=value form of
//! connection strings is passed through unchanged, so there they are
//! refused with a message that says to write a URL.
//! (Everything the relay sends the database is what the database stores
//! anyway: THREAT-MODEL.md, 6a.)

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;

use percent_encoding::percent_decode_str;
use postgres::config::SslMode;
use postgres::{Client, Config};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::StoreError;

/// How the relay reaches its database: the driver's configuration and the
/// TLS connector its `sslmode` asks for.
#[derive(Clone)]
pub(super) struct DbConfig {
    pub pg: Config,
    tls: MakeRustlsConnect,
}

impl DbConfig {
    pub fn parse(url: &str) -> Result<DbConfig, StoreError> {
        let bad = |m: String| StoreError::Config(m);
        let (rest, verify) = split_verification(url).map_err(bad)?;
        let mut pg = Config::from_str(&rest).map_err(|e| StoreError::Postgres(Arc::new(e)))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let (chain, check_name) = match verify {
            None => (None, false),
            Some(v) => {
                pg.ssl_mode(SslMode::Require);
                let roots = Arc::new(v.roots().map_err(bad)?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| {
                        bad(format!("cannot use the database's root certificates: {e}"))
                    })?;
                (Some(webpki), v.check_name)
            }
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(DbVerifier {
                provider,
                chain,
                check_name,
            }))
            .with_no_client_auth();
        Ok(DbConfig {
            pg,
            tls: MakeRustlsConnect::new(config),
        })
    }

    pub fn connect(&self) -> Result<Client, postgres::Error> {
        self.pg.connect(self.tls.clone())
    }
}

/// `sslmode=verify-ca` or `verify-full`, and where the roots are.
#[derive(Debug, PartialEq)]
struct Verification {
    check_name: bool,
    /// `None`: Mozilla's root set.
    root_file: Option<String>,
}

impl Verification {
    fn roots(&self) -> Result<RootCertStore, String> {
        let Some(path) = &self.root_file else {
            return Ok(RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            });
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect())
            .map_err(|e| format!("cannot read sslrootcert {path}: {e}"))?;
        let mut store = RootCertStore::empty();
        let (added, _ignored) = store.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!(
                "sslrootcert {path} holds no usable certificate (a PEM file of CA certificates is expected)"
            ));
        }
        Ok(store)
    }
}

/// Takes `sslmode=verify-*` and `sslrootcert` out of a `postgres://` URL,
/// which is returned without them. A key=value string is returned as it is
/// unless it uses them, which is refused.
fn split_verification(url: &str) -> Result<(Cow<'_, str>, Option<Verification>), String> {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    if !is_url {
        if url.contains("verify-ca") || url.contains("verify-full") || url.contains("sslrootcert") {
            return Err(
                "sslmode=verify-ca, verify-full and sslrootcert are read from \
                 postgres:// URLs only: write the connection string as a URL \
                 (postgres://USER@HOST:PORT/DATABASE?sslmode=verify-full&sslrootcert=FILE)"
                    .into(),
            );
        }
        return Ok((Cow::Borrowed(url), None));
    }
    let Some((base, query)) = url.split_once('?') else {
        return Ok((Cow::Borrowed(url), None));
    };
    let mut mode = None;
    let mut root_file = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode_str(k).decode_utf8_lossy();
        let value = percent_decode_str(v)
            .decode_utf8()
            .map_err(|_| format!("the value of {key} in the database URL is not UTF-8"))?;
        match &*key {
            "sslmode" if value == "verify-ca" || value == "verify-full" => {
                mode = Some(value == "verify-full")
            }
            "sslmode" => {
                mode = None;
                kept.push(pair.to_string());
            }
            "sslrootcert" => root_file = Some(value.into_owned()),
            _ => kept.push(pair.to_string()),
        }
    }
    let Some(check_name) = mode else {
        if root_file.is_some() {
            return Err(
                "sslrootcert is given but sslmode is not verify-ca or verify-full, \
                 so the certificate would not be checked: add sslmode=verify-full"
                    .into(),
            );
        }
        return Ok((Cow::Borrowed(url), None));
    };
    let root_file = root_file.filter(|f| f != "system");
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((
        Cow::Owned(rest),
        Some(Verification {
            check_name,
            root_file,
        }),
    ))
}

/// The certificate check of every mode. The handshake signatures are
/// always checked (the server must hold its certificate's key, as libpq's
/// `require` also insists); the certificate itself only with a chain
/// verifier (`verify-ca`, `verify-full`): webpki's, which for `verify-ca`
/// accepts a certificate for another name. webpki checks the name only
/// after the chain, so that error means the chain was good.
#[derive(Debug)]
struct DbVerifier {
    provider: Arc<CryptoProvider>,
    /// `None`: any certificate (`prefer`, `require`).
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
}

impl ServerCertVerifier for DbVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

    fn split(url: &str) -> (String, Option<Verification>) {
        let (rest, v) = split_verification(url).unwrap();
        (rest.into_owned(), v)
    }

    #[test]
    fn verifying_modes_are_taken_out_of_urls() {
        assert_eq!(
            split("postgres://u@h/db"),
            ("postgres://u@h/db".into(), None)
        );
        assert_eq!(
            split("postgres://u@h/db?sslmode=require&application_name=x"),
            (
                "postgres://u@h/db?sslmode=require&application_name=x".into(),
                None
            )
        );
        let root = utf8_percent_encode("/etc/my ca.pem", NON_ALPHANUMERIC).to_string();
        assert_eq!(
            split(&format!(
                "postgresql://u:p@h:5/db?connect_timeout=3&sslmode=verify-full&sslrootcert={root}"
            )),
            (
                "postgresql://u:p@h:5/db?connect_timeout=3".into(),
                Some(Verification {
                    check_name: true,
                    root_file: Some("/etc/my ca.pem".into())
                })
            )
        );
        assert_eq!(
            split("postgres://h/db?sslmode=verify-ca&sslrootcert=system"),
            (
                "postgres://h/db".into(),
                Some(Verification {
                    check_name: false,
                    root_file: None
                })
            )
        );
        // The last sslmode counts, as with libpq.
        assert_eq!(
            split("postgres://h/db?sslmode=verify-full&sslmode=disable").1,
            None
        );
    }

    #[test]
    fn unverifiable_settings_are_refused() {
        assert!(split_verification("postgres://h/db?sslrootcert=/ca.pem").is_err());
        assert!(split_verification("host=/tmp sslmode=verify-full").is_err());
        assert!(split_verification("host=/tmp sslrootcert=/ca.pem").is_err());
        assert!(split_verification("host=/tmp sslmode=require").is_ok());
        let missing =
            DbConfig::parse("postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent");
        assert!(matches!(missing, Err(StoreError::Config(m)) if m.contains("/nonexistent")));
    }
}
