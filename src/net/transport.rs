//! Getting a byte stream to a relay: TCP, directly or through a SOCKS5
//! proxy (Tor), TLS for `tern+https://` fronts, and the WebSocket upgrade.
//!
//! Everything here is blocking with timeouts; the session driver turns the
//! socket non-blocking once the session is up. None of it is trusted for
//! anything but carrying bytes: the relay is authenticated by the session
//! handshake with the key pinned in its address.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rand::rngs::OsRng;
use rand::RngCore;
use tern_wire::address::{RelayAddress, Transport};
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::WebSocket;

/// How long connecting (TCP, proxy, TLS and the upgrade) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where relay connections go through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    /// `host:port` of the SOCKS5 proxy.
    pub addr: String,
    /// Host names are resolved by the proxy (`socks5h://`), so no DNS
    /// request leaves this machine; with `socks5://` they are resolved here.
    pub remote_dns: bool,
}

impl Proxy {
    /// Parses `socks5h://HOST:PORT` or `socks5://HOST:PORT`.
    pub fn parse(text: &str) -> Result<Proxy, String> {
        let text = text.trim();
        let (remote_dns, rest) = if let Some(r) = text.strip_prefix("socks5h://") {
            (true, r)
        } else if let Some(r) = text.strip_prefix("socks5://") {
            (false, r)
        } else {
            return Err(format!(
                "the proxy {text:?} must be socks5h://HOST:PORT (names resolved by the proxy, as Tor needs) or socks5://HOST:PORT"
            ));
        };
        let rest = rest.trim_end_matches('/');
        let ok = rest
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !ok {
            return Err(format!("the proxy {text:?} needs a host and a port"));
        }
        Ok(Proxy {
            addr: rest.to_string(),
            remote_dns,
        })
    }
}

/// A connection's byte stream, plain or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp().as_raw_fd()
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// The WebSocket limits of a client session: frames are at most a full
/// transport message.
pub fn ws_config() -> WebSocketConfig {
    let max = tern_wire::session::MAX_MESSAGE_LEN.max(tern_wire::session::MSG2_LEN);
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

fn tcp(
    relay: &RelayAddress,
    proxy: Option<&Proxy>,
    isolation: Option<&[u8; 16]>,
) -> io::Result<TcpStream> {
    let host = relay.server_name();
    let stream = match proxy {
        None => {
            let addrs: Vec<_> = (host.as_str(), relay.port).to_socket_addrs()?.collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name has no address");
            let mut found = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            found.ok_or(last)?
        }
        Some(p) => {
            let target: socks::TargetAddr = if p.remote_dns {
                socks::ToTargetAddr::to_target_addr(&(host.as_str(), relay.port))?
            } else {
                let a = (host.as_str(), relay.port)
                    .to_socket_addrs()?
                    .next()
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::NotFound, "the host name has no address")
                    })?;
                socks::TargetAddr::Ip(a)
            };
            // Credentials of their own per isolated connection: Tor puts
            // streams with different SOCKS credentials on different circuits
            // (IsolateSOCKSAuth), so isolated queues share no exit.
            let s = match isolation {
                Some(_) => {
                    let mut user = [0u8; 16];
                    let mut pass = [0u8; 16];
                    OsRng.fill_bytes(&mut user);
                    OsRng.fill_bytes(&mut pass);
                    let hex = data_encoding::HEXLOWER;
                    socks::Socks5Stream::connect_with_password(
                        p.addr.as_str(),
                        target,
                        &hex.encode(&user),
                        &hex.encode(&pass),
                    )?
                }
                None => socks::Socks5Stream::connect(p.addr.as_str(), target)?,
            };
            s.into_inner()
        }
    };
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    stream.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    Ok(stream)
}

/// The TLS configuration for `tern+https://` fronts: the Mozilla root
/// programme's CAs, and those in the PEM file `TERN_TLS_CA` names (for a
/// front with a private CA).
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            if let Some(path) = std::env::var_os("TERN_TLS_CA") {
                use rustls::pki_types::pem::PemObject;
                let certs =
                    rustls::pki_types::CertificateDer::pem_file_iter(&path).map_err(|e| {
                        format!("cannot read TERN_TLS_CA ({}): {e}", path.to_string_lossy())
                    })?;
                for c in certs {
                    let c =
                        c.map_err(|e| format!("TERN_TLS_CA ({}): {e}", path.to_string_lossy()))?;
                    roots
                        .add(c)
                        .map_err(|e| format!("TERN_TLS_CA ({}): {e}", path.to_string_lossy()))?;
                }
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
}

/// Why a connection could not be made.
#[derive(Debug)]
pub enum ConnectError {
    /// The network, the proxy, TLS: worth trying again later.
    Io(String),
    /// Something answered that is not a relay (an HTTP status instead of the
    /// upgrade).
    Http(u16),
    /// The TLS front or `TERN_TLS_CA` is misconfigured.
    Tls(String),
}

/// Connects to the relay's session endpoint: TCP (through the proxy, if
/// any), TLS for `tern+https://`, then the WebSocket upgrade.
pub fn connect(
    relay: &RelayAddress,
    proxy: Option<&Proxy>,
    isolation: Option<&[u8; 16]>,
) -> Result<WebSocket<Stream>, ConnectError> {
    let io = |e: io::Error| ConnectError::Io(e.to_string());
    let sock = tcp(relay, proxy, isolation).map_err(io)?;
    let stream = match relay.transport {
        Transport::Http => Stream::Plain(sock),
        Transport::Https => {
            let config = tls_config().map_err(ConnectError::Tls)?;
            let name = rustls::pki_types::ServerName::try_from(relay.server_name())
                .map_err(|e| ConnectError::Tls(e.to_string()))?;
            let conn = rustls::ClientConnection::new(config, name)
                .map_err(|e| ConnectError::Tls(e.to_string()))?;
            let mut s = rustls::StreamOwned::new(conn, sock);
            // Finish the TLS handshake now, so that its failures are told
            // apart from the WebSocket's.
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock).map_err(|e| {
                    if e.kind() == io::ErrorKind::InvalidData {
                        ConnectError::Tls(e.to_string())
                    } else {
                        ConnectError::Io(e.to_string())
                    }
                })?;
            }
            Stream::Tls(Box::new(s))
        }
    };
    let mut request = relay
        .endpoint()
        .into_client_request()
        .map_err(|e| ConnectError::Io(e.to_string()))?;
    // No User-Agent, no Origin: nothing that tells one client from another.
    request.headers_mut().remove("user-agent");
    match tungstenite::client::client_with_config(request, stream, Some(ws_config())) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            Err(ConnectError::Http(resp.status().as_u16()))
        }
        Err(tungstenite::HandshakeError::Failure(e)) => Err(ConnectError::Io(e.to_string())),
        Err(tungstenite::HandshakeError::Interrupted(_)) => Err(ConnectError::Io(
            "the relay did not answer the upgrade in time".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxies_parse() {
        assert_eq!(
            Proxy::parse("socks5h://127.0.0.1:9050").unwrap(),
            Proxy {
                addr: "127.0.0.1:9050".into(),
                remote_dns: true
            }
        );
        assert!(!Proxy::parse("socks5://localhost:1080/").unwrap().remote_dns);
        for bad in [
            "http://x:1",
            "socks5h://x",
            "socks5h://:80",
            "socks5h://x:0",
            "x:1",
        ] {
            assert!(Proxy::parse(bad).is_err(), "{bad}");
        }
    }
}
