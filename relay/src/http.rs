//! Just enough HTTP/1.1 for the relay: request heads in, fixed responses out.
//!
//! The relay serves two things: `GET /v2` upgraded to a WebSocket (a relay
//! session) and `GET /` (the operator page). Heads are parsed by `httparse`;
//! on top of it the relay refuses, from the head alone and before reading
//! anything else, what it will not serve: a head over [`MAX_HEAD`] bytes
//! (431), bare CR or LF line ends (400), any request body (413, or 411 for
//! `Transfer-Encoding`), another HTTP version (505), and a WebSocket version
//! other than 13 (426).

use data_encoding::BASE64;

/// Longest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 8192;
/// Most header fields in one head.
const MAX_HEADERS: usize = 48;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Root,
    Session,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upgrade {
    /// Not an upgrade request.
    None,
    /// A valid WebSocket upgrade; the `Sec-WebSocket-Accept` value to answer.
    WebSocket { accept: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Bytes of the head, including leading empty lines and the final CRLF CRLF.
    pub len: usize,
    pub method: Method,
    pub target: Target,
    pub keep_alive: bool,
    pub upgrade: Upgrade,
    /// The client's address as a trusted front gave it (the last one in the
    /// header named by `forwarded_header`), when asked for and present.
    pub forwarded_for: Option<std::net::IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// No complete head yet.
    Incomplete,
    Head(Head),
    /// Answer with this status and close the connection.
    Bad(u16),
}

fn allowed_in_head(b: u8) -> bool {
    b == b'\r' || b == b'\n' || b == b'\t' || (0x20..0x7f).contains(&b)
}

/// Every CR is followed by LF and every LF preceded by CR: a bare one is how
/// requests are smuggled past fronts that split lines differently.
fn line_ends_are_crlf(head: &[u8]) -> bool {
    head.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => head.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && head[i - 1] == b'\r',
        _ => true,
    })
}

fn has_token(value: &[u8], token: &str) -> bool {
    std::str::from_utf8(value)
        .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// The `Sec-WebSocket-Accept` value for a client's key (RFC 6455 §4.2.2).
pub fn websocket_accept(key: &[u8]) -> String {
    tungstenite::handshake::derive_accept_key(key)
}

/// Parses the request head at the start of `buf`. `forwarded_header` names
/// the header a trusted front puts the client's address in (`X-Forwarded-For`).
pub fn parse_head(buf: &[u8], forwarded_header: Option<&str>) -> Parse {
    // RFC 9112 §2.2: ignore empty lines before the request line.
    let mut start = 0;
    while buf[start..].starts_with(b"\r\n") {
        start += 2;
    }
    let window = &buf[start..buf.len().min(start + MAX_HEAD)];
    let Some(end) = window.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if window.len() >= MAX_HEAD {
            Parse::Bad(431)
        } else if window.iter().any(|&b| !allowed_in_head(b)) || !line_ends_are_crlf(window) {
            // Garbage can be refused before it fills the buffer (a bare LF
            // at the very end may still become CRLF: not refused yet).
            if window.last() == Some(&b'\r') && line_ends_are_crlf(&window[..window.len() - 1]) {
                Parse::Incomplete
            } else {
                Parse::Bad(400)
            }
        } else {
            Parse::Incomplete
        };
    };
    let head = &window[..end + 4];
    if !head.iter().all(|&b| allowed_in_head(b)) || !line_ends_are_crlf(head) {
        return Parse::Bad(400);
    }
    // A well-formed request line of another HTTP version is 505, not 400.
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let parts: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    if let [_, _, version] = parts[..] {
        if version.starts_with(b"HTTP/") && version != b"HTTP/1.1" && version != b"HTTP/1.0" {
            return Parse::Bad(505);
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Ok(_) => return Parse::Bad(400),
        Err(httparse::Error::TooManyHeaders) => return Parse::Bad(431),
        Err(_) => return Parse::Bad(400),
    }
    let version = req.version.unwrap_or(1);
    let method = match req.method {
        Some("GET") => Method::Get,
        _ => Method::Other,
    };
    let target = match req.path {
        Some("/") => Target::Root,
        Some(p) if p == tern_wire::address::SESSION_PATH => Target::Session,
        _ => Target::Other,
    };
    let mut keep_alive = version == 1;
    let mut content_length: Option<&[u8]> = None;
    let mut host = false;
    let (mut upgrade_ws, mut connection_upgrade) = (false, false);
    let (mut ws_key, mut ws_version) = (None, None);
    let mut forwarded_for = None;
    for h in req.headers.iter() {
        let name = h.name;
        let value = h.value;
        if forwarded_header.is_some_and(|f| name.eq_ignore_ascii_case(f)) {
            // The front appends the address it saw: the last one is the
            // only one it vouches for.
            forwarded_for = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.rsplit(',').next())
                .and_then(|a| a.trim().parse().ok());
        }
        if name.eq_ignore_ascii_case("content-length") {
            let trimmed: &[u8] = value.trim_ascii();
            if trimmed.is_empty() || !trimmed.iter().all(u8::is_ascii_digit) {
                return Parse::Bad(400);
            }
            if content_length.is_some_and(|c| c != trimmed) {
                return Parse::Bad(400);
            }
            content_length = Some(trimmed);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Parse::Bad(411);
        } else if name.eq_ignore_ascii_case("host") {
            if host {
                return Parse::Bad(400);
            }
            host = true;
        } else if name.eq_ignore_ascii_case("connection") {
            if has_token(value, "close") {
                keep_alive = false;
            } else if has_token(value, "keep-alive") && version == 0 {
                keep_alive = true;
            }
            connection_upgrade |= has_token(value, "upgrade");
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_ws |= has_token(value, "websocket");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            ws_key = Some(value.trim_ascii());
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            ws_version = Some(value.trim_ascii());
        }
    }
    // No request the relay serves has a body: refusing it here means it is
    // never read in.
    if content_length.is_some_and(|c| c.iter().any(|&d| d != b'0')) {
        return Parse::Bad(413);
    }
    if version == 1 && !host {
        return Parse::Bad(400);
    }
    let upgrade = if upgrade_ws && connection_upgrade {
        if version != 1 || method != Method::Get {
            return Parse::Bad(400);
        }
        if ws_version != Some(b"13") {
            return Parse::Bad(426);
        }
        let valid_key = ws_key
            .and_then(|k| BASE64.decode(k).ok())
            .is_some_and(|k| k.len() == 16);
        if !valid_key {
            return Parse::Bad(400);
        }
        Upgrade::WebSocket {
            accept: websocket_accept(ws_key.unwrap_or_default()),
        }
    } else {
        Upgrade::None
    };
    Parse::Head(Head {
        len: start + end + 4,
        method,
        target,
        keep_alive,
        upgrade,
        forwarded_for,
    })
}

pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// A complete response: head and body.
pub fn response(
    status: u16,
    content_type: Option<&str>,
    extra_headers: &str,
    body: &[u8],
    close: bool,
) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    if let Some(ct) = content_type {
        head.push_str("Content-Type: ");
        head.push_str(ct);
        head.push_str("\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    head.push_str(extra_headers);
    if status == 426 {
        head.push_str("Sec-WebSocket-Version: 13\r\n");
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    out
}

/// An error response with no body.
pub fn empty(status: u16, close: bool) -> Vec<u8> {
    response(status, None, "", &[], close)
}

/// The answer that turns the connection into a WebSocket.
pub fn switching_protocols(accept: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> Head {
        match parse_head(s.as_bytes(), Some("x-forwarded-for")) {
            Parse::Head(h) => h,
            other => panic!("{s:?}: {other:?}"),
        }
    }

    const UPGRADE: &str = "GET /v2 HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn parses_an_upgrade_and_the_page() {
        let h = head(UPGRADE);
        assert_eq!(h.target, Target::Session);
        // The example of RFC 6455 §1.3.
        assert_eq!(
            h.upgrade,
            Upgrade::WebSocket {
                accept: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into()
            }
        );
        let h = head("\r\nGET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(h.keep_alive && h.target == Target::Root && h.upgrade == Upgrade::None);
        let h =
            head("GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        assert!(!h.keep_alive && h.target == Target::Other);
        let h = head("GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.1, 2001:db8::7\r\n\r\n");
        assert_eq!(h.forwarded_for, Some("2001:db8::7".parse().unwrap()));
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        for (req, status) in [
            (
                "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                411,
            ),
            (
                "POST /v2 HTTP/1.1\r\nHost: a\r\nContent-Length: 16384\r\n\r\n",
                413,
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
                400,
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nContent-Length : 1\r\n\r\n",
                400,
            ),
            ("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\n\r\n", 400),
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
            ("GET  / HTTP/1.1\r\n\r\n", 400),
            ("GET /\r\n\r\n", 400),
            ("GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400),
            (&UPGRADE.replace("Version: 13", "Version: 8"), 426),
            (&UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "short"), 400),
            (&UPGRADE.replace("HTTP/1.1", "HTTP/1.0"), 400),
        ] {
            assert_eq!(
                parse_head(req.as_bytes(), None),
                Parse::Bad(status),
                "{req:?}"
            );
        }
        assert_eq!(
            parse_head(b"\x16\x03\x01\x02\x00\x01", None),
            Parse::Bad(400)
        );
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\nHost", None),
            Parse::Bad(400),
            "bare LF, early"
        );
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nHost", None),
            Parse::Incomplete
        );
        assert_eq!(parse_head(b"GET / HTTP/1.1\r", None), Parse::Incomplete);
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(parse_head(long.as_bytes(), None), Parse::Bad(431));
        let many: String = (0..60).map(|i| format!("X{i}: y\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse_head(many.as_bytes(), None), Parse::Bad(431));
    }
}
