//! JSON-RPC 2.0, one object per line: reading requests, writing responses,
//! and the error codes (docs/JSONRPC.md lists them).
//!
//! Errors of tern itself carry the exit code the CLI would have given:
//! code -32000 − exit code (-32003: no such contact, -32075: temporary),
//! with `data.exit_code` and `data.retryable`. Text in responses and
//! notifications is written with `json_text`, so hostile names and
//! messages stay exact and carry no raw control character.

use std::io::{self, BufRead};

use serde_json::{json, Value};

use crate::cli::exit::{self, TRY_AGAIN};
use crate::cli::output::json_text;

/// Longest request line: a 16 KiB message escaped as `\u` sequences is
/// about 100 KiB, so 1 MiB leaves room and bounds what a client can make
/// the daemon hold.
pub const MAX_LINE: usize = 1 << 20;

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;
/// The `profile` named is not served, or several are and none was named.
pub const UNKNOWN_PROFILE: i64 = -32100;
/// `ack`: no pending message has that id.
pub const NOT_PENDING: i64 = -32101;
/// Too many clients are connected.
pub const BUSY: i64 = -32102;

/// A JSON-RPC error object.
#[derive(Debug)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }

    pub fn params(message: impl Into<String>) -> RpcError {
        RpcError::new(INVALID_PARAMS, message)
    }

    /// The error of a CLI exit code: -32000 − code, with the code and
    /// whether trying again later may help.
    pub fn exit(code: u8, message: impl Into<String>) -> RpcError {
        RpcError {
            code: -32000 - i64::from(code),
            message: message.into(),
            data: Some(json!({"exit_code": code, "retryable": code == TRY_AGAIN})),
        }
    }

    /// Adds fields to `data`.
    pub fn with(mut self, extra: Value) -> RpcError {
        let mut data = self.data.take().unwrap_or_else(|| json!({}));
        if let (Some(d), Value::Object(e)) = (data.as_object_mut(), extra) {
            d.extend(e);
        }
        self.data = Some(data);
        self
    }

    fn to_value(&self) -> Value {
        let mut e = json!({"code": self.code, "message": self.message});
        if let Some(d) = &self.data {
            e["data"] = d.clone();
        }
        e
    }
}

impl From<anyhow::Error> for RpcError {
    fn from(e: anyhow::Error) -> RpcError {
        RpcError::exit(exit::code_for(&e), chain(&e))
    }
}

impl From<crate::client::ClientError> for RpcError {
    fn from(e: crate::client::ClientError) -> RpcError {
        anyhow::Error::from(e).into()
    }
}

impl From<crate::store::StoreError> for RpcError {
    fn from(e: crate::store::StoreError) -> RpcError {
        anyhow::Error::from(e).into()
    }
}

/// "what failed: why", as `main` writes errors.
pub fn chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

pub fn response(id: &Value, result: Result<Value, RpcError>) -> Value {
    match result {
        Ok(r) => json!({"jsonrpc": "2.0", "id": id, "result": r}),
        Err(e) => json!({"jsonrpc": "2.0", "id": id, "error": e.to_value()}),
    }
}

/// A notification line: `{"jsonrpc":"2.0","method":…,"params":…}`.
pub fn notification(method: &str, params: Value) -> String {
    json_text(&json!({"jsonrpc": "2.0", "method": method, "params": params}))
}

/// A request, checked: its id (`None`: a notification, never answered),
/// method and params (an object; absent is `{}`).
pub struct Request {
    pub id: Option<Value>,
    pub method: String,
    pub params: Value,
}

/// Checks one request object; `Err` is the response to send instead.
pub fn parse_request(v: Value) -> Result<Request, Value> {
    let id = v.get("id").cloned();
    let bad_id = |id: &Option<Value>| match id {
        Some(i) => !(i.is_string() || i.is_number() || i.is_null()),
        None => false,
    };
    let answer_id = if bad_id(&id) {
        Value::Null
    } else {
        id.clone().unwrap_or(Value::Null)
    };
    let invalid = |why: &str| response(&answer_id, Err(RpcError::new(INVALID_REQUEST, why)));
    if !v.is_object() {
        return Err(invalid("a request is a JSON object"));
    }
    if v.get("jsonrpc") != Some(&json!("2.0")) {
        return Err(invalid("\"jsonrpc\" must be \"2.0\""));
    }
    if bad_id(&id) {
        return Err(invalid("\"id\" must be a string, a number or null"));
    }
    let Some(method) = v.get("method").and_then(Value::as_str) else {
        return Err(invalid("\"method\" must be a string"));
    };
    let params = match v.get("params") {
        None | Some(Value::Null) => json!({}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(response(
                &answer_id,
                Err(RpcError::params(
                    "\"params\" must be an object (named parameters)",
                )),
            ))
        }
    };
    Ok(Request {
        id,
        method: method.to_string(),
        params,
    })
}

/// One line read with a bound.
pub enum Line {
    Text(Vec<u8>),
    /// Longer than [`MAX_LINE`]: skipped up to its end.
    TooLong,
    Eof,
}

/// Reads up to the next newline, never holding more than `max` bytes.
pub fn read_line(r: &mut impl BufRead, max: usize) -> io::Result<Line> {
    let mut buf = Vec::new();
    let mut too_long = false;
    loop {
        let chunk = match r.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok(match (too_long, buf.is_empty()) {
                (true, _) => Line::TooLong,
                (false, true) => Line::Eof,
                // A last line without its newline still counts.
                (false, false) => Line::Text(buf),
            });
        }
        let (part, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], Some(i + 1)),
            None => (chunk, None),
        };
        if !too_long {
            if buf.len() + part.len() > max {
                too_long = true;
                buf = Vec::new();
            } else {
                buf.extend_from_slice(part);
            }
        }
        let used = done.unwrap_or(chunk.len());
        r.consume(used);
        if done.is_some() {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Text(buf)
            });
        }
    }
}

// Parameter helpers: a wrong type is an error, never a silent default.

pub fn opt_str<'a>(p: &'a Value, name: &str) -> Result<Option<&'a str>, RpcError> {
    match p.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(RpcError::params(format!("\"{name}\" must be a string"))),
    }
}

pub fn req_str<'a>(p: &'a Value, name: &str) -> Result<&'a str, RpcError> {
    opt_str(p, name)?.ok_or_else(|| RpcError::params(format!("\"{name}\" is required")))
}

pub fn opt_u64(p: &Value, name: &str) -> Result<Option<u64>, RpcError> {
    match p.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| RpcError::params(format!("\"{name}\" must be a non-negative integer"))),
    }
}

/// Refuses parameters a method does not know (a typo would otherwise be
/// ignored silently).
pub fn only(p: &Value, known: &[&str]) -> Result<(), RpcError> {
    if let Some(o) = p.as_object() {
        if let Some(k) = o.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(RpcError::params(format!(
                "unknown parameter \"{}\" (this method takes: {})",
                crate::proto::text::escape_text(k),
                known.join(", ")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<String> {
        let mut r = io::BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        loop {
            match read_line(&mut r, max).unwrap() {
                Line::Text(t) => out.push(String::from_utf8(t).unwrap()),
                Line::TooLong => out.push("<too long>".into()),
                Line::Eof => return out,
            }
        }
    }

    #[test]
    fn lines_are_bounded() {
        assert_eq!(lines(b"ab\ncd\n", 10), ["ab", "cd"]);
        assert_eq!(
            lines(b"0123456789abc\nok\nlast", 10),
            ["<too long>", "ok", "last"]
        );
        assert_eq!(lines(b"", 10), Vec::<String>::new());
    }

    #[test]
    fn requests_are_checked() {
        let ok = parse_request(json!({"jsonrpc": "2.0", "id": 1, "method": "contacts"}));
        assert!(ok.is_ok_and(|r| r.params == json!({}) && r.id == Some(json!(1))));
        for (bad, code) in [
            (json!([1]), INVALID_REQUEST),
            (json!({"id": 1, "method": "x"}), INVALID_REQUEST),
            (
                json!({"jsonrpc": "2.0", "id": {}, "method": "x"}),
                INVALID_REQUEST,
            ),
            (
                json!({"jsonrpc": "2.0", "id": 1, "method": 5}),
                INVALID_REQUEST,
            ),
            (
                json!({"jsonrpc": "2.0", "id": 1, "method": "x", "params": [1]}),
                INVALID_PARAMS,
            ),
        ] {
            let e = parse_request(bad.clone()).err().unwrap();
            assert_eq!(e["error"]["code"], code, "{bad}");
        }
        let e = RpcError::exit(75, "later");
        assert_eq!(e.code, -32075);
        assert_eq!(e.data.unwrap()["retryable"], true);
    }
}
