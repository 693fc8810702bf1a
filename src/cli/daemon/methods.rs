//! The methods: each one the CLI command of the same name, on a profile
//! that stays unlocked. docs/JSONRPC.md is their reference.

use std::collections::HashSet;
use std::sync::{Arc, MutexGuard, PoisonError};
use std::time::Duration;

use data_encoding::HEXLOWER;
use serde_json::{json, Value};

use super::hub::Conn;
use super::rpc::{
    notification, only, opt_str, opt_u64, req_str, RpcError, INTERNAL_ERROR, METHOD_NOT_FOUND,
    NOT_PENDING, UNKNOWN_PROFILE,
};
use super::{Daemon, Ready, Served};
use crate::cli::exit::{BAD_INVITATION, GONE, NOT_DELIVERED, TRY_AGAIN, USAGE};
use crate::cli::{accept, contacts, device, invite, profile, rotate, verify};
use crate::client::{now, Client};
use crate::proto::envelope::{Kind, MAX_BODY_LEN};
use crate::proto::hello::Channel;
use crate::proto::text::escape_text;

/// A method: what it does for the client on a connection.
type Method = fn(&Daemon, &Value, &Arc<Conn>) -> Result<Value, RpcError>;

/// Every method the daemon answers. The one list: dispatch, the -32601
/// message and the test that holds docs/jsonrpc.schema.json to the daemon
/// all read it, so none can name a method the others do not.
const METHODS: &[(&str, Method)] = &[
    ("profiles", Daemon::profiles),
    ("subscribe", Daemon::subscribe),
    ("ack", Daemon::ack),
    ("send", Daemon::send),
    ("contacts", Daemon::contacts),
    ("invite", Daemon::invite),
    ("accept", Daemon::accept),
    ("profile", Daemon::profile),
    ("relays", Daemon::relays),
    ("log", Daemon::log),
    ("verify", Daemon::verify),
    ("rotate", Daemon::rotate),
    ("devices", Daemon::devices),
    ("device_remove", Daemon::device_remove),
    // Files (src/cli/daemon/files.rs).
    ("send_file", |d, p, c| d.send_file(p, c)),
    ("files", |d, p, _| d.files(p)),
    ("file_get", |d, p, c| d.file_get(p, c)),
    ("file_cancel", |d, p, _| d.file_cancel(p)),
    ("file_retry", |d, p, c| d.file_retry(p, c)),
];

/// The names of the methods, in the order of [`METHODS`].
pub fn method_names() -> impl Iterator<Item = &'static str> {
    METHODS.iter().map(|(name, _)| *name)
}

/// The longest `send` may wait for a delivery receipt (`wait_delivered`).
const MAX_WAIT_DELIVERED: u64 = 24 * 3600;

impl Ready {
    pub(super) fn client(&self) -> MutexGuard<'_, Client> {
        self.client.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Daemon {
    /// Runs one method for the client on `conn`.
    pub(super) fn call(
        &self,
        method: &str,
        p: &Value,
        conn: &Arc<Conn>,
    ) -> Result<Value, RpcError> {
        match METHODS.iter().find(|(name, _)| *name == method) {
            Some((_, run)) => run(self, p, conn),
            None => Err(RpcError::new(
                METHOD_NOT_FOUND,
                format!(
                    "no method \"{}\" (see docs/JSONRPC.md: {})",
                    escape_text(method),
                    method_names().collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }

    fn profiles(&self, p: &Value, _: &Arc<Conn>) -> Result<Value, RpcError> {
        only(p, &[])?;
        Ok(self.profiles_json())
    }

    fn contacts(&self, p: &Value, _: &Arc<Conn>) -> Result<Value, RpcError> {
        only(p, &["profile"])?;
        let (_, r) = self.ready(p)?;
        Ok(Value::Array(contacts::contacts_json(&r.client())?))
    }

    /// Shows the profile; with `name` or `status`, changes it first and
    /// sends it to every contact, as `tern profile --name`.
    fn profile(&self, p: &Value, _: &Arc<Conn>) -> Result<Value, RpcError> {
        only(p, &["profile", "name", "status"])?;
        let name = opt_str(p, "name")?;
        let status = opt_str(p, "status")?;
        let (_, r) = self.ready(p)?;
        let mut c = r.client();
        let sent = if name.is_some() || status.is_some() {
            Some(profile::update(&mut c, name, status, None)?)
        } else {
            None
        };
        let s = c.settings()?;
        let pr = &s.profile;
        let mut out = json!({"name": pr.name, "status": pr.status, "avatar_bytes": pr.avatar.as_ref().map(Vec::len)});
        if let Some(sent) = sent {
            out["sent_to"] = json!(sent.contacts);
            out["waiting"] = json!(sent.waiting);
        }
        Ok(out)
    }

    /// `tern verify`: the codes, or with `code` the comparison (the
    /// matching connections are marked verified; a mismatch is -32004).
    fn verify(&self, p: &Value, _: &Arc<Conn>) -> Result<Value, RpcError> {
        only(p, &["profile", "contact", "code"])?;
        let contact = req_str(p, "contact")?;
        let theirs = opt_str(p, "code")?
            .map(|typed| {
                verify::parse_code(typed).ok_or_else(|| {
                    RpcError::exit(
                        USAGE,
                        "that is not a security code: a code is 30 digits in six groups; \
                         nothing was compared",
                    )
                })
            })
            .transpose()?;
        let (_, r) = self.ready(p)?;
        let mut c = r.client();
        let codes = verify::codes(&c, contact)?;
        let Some(theirs) = theirs else {
            return Ok(verify::code_json(&c, contact, &codes)?);
        };
        let matched = verify::compare(&mut c, contact, &codes, &theirs);
        let result =
            json!({"contact": contact, "match": matched.is_ok(), "verified": matched.is_ok()});
        match matched {
            Ok(()) => Ok(result),
            Err(e) => Err(RpcError::from(e).with(result)),
        }
    }

    /// `tern rotate CONTACT` (or `--all`): fresh queues and keys; the
    /// daemon's receiving completes the move.
    fn rotate(&self, p: &Value, _: &Arc<Conn>) -> Result<Value, RpcError> {
        only(p, &["profile", "contact", "all"])?;
        let contact = opt_str(p, "contact")?;
        let all = match p.get("all") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(RpcError::params("\"all\" must be true or false")),
        };
        if contact.is_some() == all {
            return Err(RpcError::params("give either \"contact\" or \"all\": true"));
        }
        let (_, r) = self.ready(p)?;
        let started = rotate::rotate(&mut r.client(), contact)?;
        Ok(Value::Array(
            started
                .into_iter()
                .map(|s| json!({"contact": s.contact, "warnings": s.warnings}))
                .collect(),
        ))
    }

    /// `tern device list --json`, as an array.
    fn devices(&self, p: &Value, _: &Arc<Conn>) -> Result<Value, RpcError> {
        only(p, &["profile"])?;
        let (_, r) = self.ready(p)?;
        Ok(Value::Array(device::devices_json(&r.client())?))
    }

    /// `tern device remove NAME`. Queues that could not be deleted yet are
    /// -32075 (the rest is done; deleting them is retried).
    fn device_remove(&self, p: &Value, _: &Arc<Conn>) -> Result<Value, RpcError> {
        only(p, &["profile", "device"])?;
        let name = req_str(p, "device")?;
        let (_, r) = self.ready(p)?;
        let d = device::remove_device(&mut r.client(), name)?;
        let result = json!({
            "device": name,
            "withdrawn": d.withdrawn,
            "contacts_told": d.contacts_told,
            "devices_removed": d.devices_removed,
            "contacts_dropped": d.contacts_dropped,
            "queues_left": d.queues_left,
        });
        if d.queues_left > 0 {
            return Err(RpcError::exit(
                TRY_AGAIN,
                format!(
                    "{} of its queues could not be deleted yet (relay unreachable); the daemon \
                     keeps trying",
                    d.queues_left
                ),
            )
            .with(result));
        }
        Ok(result)
    }

    fn relays(&self, p: &Value, _: &Arc<Conn>) -> Result<Value, RpcError> {
        only(p, &["profile"])?;
        let (_, r) = self.ready(p)?;
        let s = r.client().settings()?;
        Ok(Value::Array(
            s.relay_addresses()
                .iter()
                .map(|a| json!({"address": a.without_access_key().to_string(), "access_key": a.access_key.is_some()}))
                .collect(),
        ))
    }

    fn profiles_json(&self) -> Value {
        Value::Array(
            self.profiles
                .iter()
                .map(|s| match &s.state {
                    Ok(_) => json!({"profile": s.label, "name": s.name, "ok": true}),
                    Err(f) => json!({
                        "profile": s.label,
                        "name": null,
                        "ok": false,
                        "error": {"message": f.message, "exit_code": f.code},
                    }),
                })
                .collect(),
        )
    }

    /// The profile `p` names: its home (as given to the daemon, or the same
    /// directory written otherwise) or its name, if no other has it.
    fn select(&self, p: &Value) -> Result<&Served, RpcError> {
        let Some(want) = opt_str(p, "profile")? else {
            if self.profiles.len() == 1 {
                return Ok(&self.profiles[0]);
            }
            return Err(RpcError::new(
                UNKNOWN_PROFILE,
                "several profiles are served: name one with \"profile\" (its home or its name; \
                 see the profiles method)",
            ));
        };
        if let Some(s) = self.profiles.iter().find(|s| s.label == want) {
            return Ok(s);
        }
        let canon = std::path::Path::new(want).canonicalize().ok();
        if let Some(s) = self
            .profiles
            .iter()
            .find(|s| canon.is_some() && s.home.canonicalize().ok() == canon)
        {
            return Ok(s);
        }
        let named: Vec<&Served> = self.profiles.iter().filter(|s| s.name == want).collect();
        match named.as_slice() {
            [one] => Ok(one),
            [] => Err(RpcError::new(
                UNKNOWN_PROFILE,
                format!(
                    "no profile \"{}\" is served here (see the profiles method)",
                    escape_text(want)
                ),
            )),
            _ => Err(RpcError::new(
                UNKNOWN_PROFILE,
                format!(
                    "several served profiles are named \"{}\": name it by its home",
                    escape_text(want)
                ),
            )),
        }
    }

    /// The profile `p` names, if it is open.
    pub(super) fn ready(&self, p: &Value) -> Result<(&Served, &Ready), RpcError> {
        let s = self.select(p)?;
        match &s.state {
            Ok(r) => Ok((s, r)),
            Err(f) => Err(RpcError::exit(
                f.code,
                format!("profile {} is not open: {}", s.label, f.message),
            )),
        }
    }

    /// `profile` if given, or else every open profile.
    fn chosen(&self, p: &Value) -> Result<Vec<(&Served, &Ready)>, RpcError> {
        if opt_str(p, "profile")?.is_some() || self.profiles.len() == 1 {
            return Ok(vec![self.ready(p)?]);
        }
        Ok(self
            .profiles
            .iter()
            .filter_map(|s| s.state.as_ref().ok().map(|r| (s, r)))
            .collect())
    }

    fn subscribe(&self, p: &Value, conn: &Arc<Conn>) -> Result<Value, RpcError> {
        only(p, &["profile", "manual_ack"])?;
        match p.get("manual_ack") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) => conn.set_manual_ack(),
            Some(_) => return Err(RpcError::params("\"manual_ack\" must be true or false")),
        }
        let chosen = self.chosen(p)?;
        let mut pending = 0;
        let mut labels = Vec::new();
        for (s, r) in &chosen {
            let (n, delivered) = r.hub.subscribe(conn);
            pending += n;
            labels.push(s.label.clone());
            if !delivered.is_empty() {
                if let Err(e) = r.client().delivered(&delivered) {
                    // They stay in the inbox: shown again after a restart.
                    crate::cli::output::note(&format!(
                        "{}: could not mark messages as delivered: {e}",
                        s.label
                    ));
                }
            }
        }
        if opt_str(p, "profile")?.is_none() {
            // What did not open is said to whoever listens.
            for s in &self.profiles {
                if let Err(f) = &s.state {
                    conn.send_line(&notification(
                        "error",
                        json!({"profile": s.label, "kind": "profile", "message": f.message, "exit_code": f.code}),
                    ));
                }
            }
        }
        Ok(json!({
            "profiles": labels,
            "pending": pending,
            "manual_ack": self.manual_ack || conn.manual_ack(),
        }))
    }

    fn ack(&self, p: &Value, _: &Arc<Conn>) -> Result<Value, RpcError> {
        only(p, &["profile", "id"])?;
        let id = req_str(p, "id")?;
        let mut acked = 0;
        for (s, r) in self.chosen(p)? {
            let seqs = r.hub.ack(id);
            if seqs.is_empty() {
                continue;
            }
            acked += seqs.len();
            r.client().delivered(&seqs).map_err(|e| {
                RpcError::new(
                    INTERNAL_ERROR,
                    format!(
                        "{}: the acknowledgement could not be stored ({e}); the message will \
                         be delivered again after a restart",
                        s.label
                    ),
                )
            })?;
        }
        if acked == 0 && self.manual_ack {
            // (A client that acknowledges by itself, without --manual-ack,
            // may find a message delivered by another: no error then.)
            return Err(RpcError::new(
                NOT_PENDING,
                format!(
                    "no pending message has the id \"{}\": acknowledged already, or not \
                     delivered by this daemon",
                    escape_text(id)
                ),
            ));
        }
        Ok(json!({"acked": acked}))
    }

    fn send(&self, p: &Value, _: &Arc<Conn>) -> Result<Value, RpcError> {
        only(p, &["profile", "contact", "text", "wait_delivered"])?;
        let contact = req_str(p, "contact")?;
        let text = req_str(p, "text")?;
        let wait = opt_u64(p, "wait_delivered")?;
        if wait.is_some_and(|w| w > MAX_WAIT_DELIVERED) {
            return Err(RpcError::exit(
                USAGE,
                format!("\"wait_delivered\" is at most {MAX_WAIT_DELIVERED} seconds"),
            ));
        }
        if text.is_empty() {
            return Err(RpcError::exit(
                USAGE,
                "the message is empty; nothing was sent",
            ));
        }
        if text.len() > MAX_BODY_LEN {
            return Err(RpcError::exit(
                USAGE,
                format!(
                    "the message is {} bytes, more than the {MAX_BODY_LEN} one message holds; \
                     nothing was sent",
                    text.len()
                ),
            ));
        }
        let (_, r) = self.ready(p)?;
        let mut c = r.client();
        let id = c.contact_id(contact)?;
        let name = c.name_of(&id)?;
        let out = c.send(&id, Kind::Text, text.as_bytes().to_vec())?;
        // The relays the message was for, less those that failed.
        let failed_relays: HashSet<&str> = out.report.errors.iter().map(|e| e.relay()).collect();
        let took: Vec<&String> = out
            .relays
            .iter()
            .filter(|r| !failed_relays.contains(r.as_str()))
            .collect();
        let failed: Vec<Value> = out
            .report
            .errors
            .iter()
            .map(|e| json!({"relay": e.relay(), "error": e.to_string()}))
            .collect();
        let state = if out.awaiting_connection {
            "awaiting-connection"
        } else if out.delivered {
            "sent"
        } else {
            "kept"
        };
        let mut result = json!({
            "id": HEXLOWER.encode(&out.id),
            "contact": name,
            "state": state,
            "relays": if out.delivered { json!(took) } else { json!([]) },
            "failed": failed,
        });
        if let Some(secs) = wait {
            if out.delivered || out.awaiting_connection {
                // The engine receives (and records the receipt); this call
                // only waits, without holding the profile.
                drop(c);
                let deadline = std::time::Instant::now() + Duration::from_secs(secs);
                let hex = HEXLOWER.encode(&out.id);
                let device = r.hub.wait_receipt(&hex, deadline).or_else(|| {
                    // Recorded before this call started waiting.
                    r.client()
                        .delivered_to(&id, &out.id)
                        .ok()
                        .and_then(|d| d.into_iter().next().map(|d| d.device))
                });
                result["delivered"] = json!(device.is_some());
                result["device"] = json!(device);
                if device.is_none() {
                    return Err(RpcError::exit(
                        NOT_DELIVERED,
                        format!(
                            "no device of {name} confirmed the message within {secs} s; it is \
                             on a relay and may still arrive (a contact who turned receipts off \
                             never confirms)"
                        ),
                    )
                    .with(result));
                }
                return Ok(result);
            }
        }
        if out.awaiting_connection {
            return Ok(result);
        }
        if out.gone && !out.delivered {
            return Err(RpcError::exit(
                GONE,
                format!(
                    "{name} deleted this connection: the message cannot reach them (it is \
                     kept; `tern forget` removes them here)"
                ),
            )
            .with(result));
        }
        if !out.delivered {
            return Err(RpcError::exit(
                TRY_AGAIN,
                format!(
                    "no relay took the message ({}); it is kept and the daemon keeps trying: \
                     sending it again would send a second copy",
                    out.report.describe()
                ),
            )
            .with(result));
        }
        Ok(result)
    }

    fn invite(&self, p: &Value, _: &Arc<Conn>) -> Result<Value, RpcError> {
        only(p, &["profile", "name", "expires"])?;
        let name = opt_str(p, "name")?;
        let expires = opt_str(p, "expires")?
            .map(|e| device::parse_expiry(e, Duration::from_secs(365 * 24 * 3600)))
            .transpose()?;
        let (_, r) = self.ready(p)?;
        let mut c = r.client();
        let (link, contact) = invite::new_contact(
            &mut c,
            name,
            Channel::Shared,
            expires.map_or(0, |d| now() + d.as_millis() as u64),
        )?;
        c.add_contact(&contact)?;
        Ok(json!({"link": link, "name": contact.name}))
    }

    fn accept(&self, p: &Value, _: &Arc<Conn>) -> Result<Value, RpcError> {
        only(p, &["profile", "link", "name"])?;
        let link = req_str(p, "link")?;
        if link == "-" {
            return Err(RpcError::exit(
                BAD_INVITATION,
                "give the invitation link itself",
            ));
        }
        let name = opt_str(p, "name")?;
        let (invitation, channel) = accept::read_any_invitation(Some(link), None)?;
        let (_, r) = self.ready(p)?;
        let mut c = r.client();
        Ok(accept::accept_invitation(
            &mut c, invitation, channel, name,
        )?)
    }

    fn log(&self, p: &Value, _: &Arc<Conn>) -> Result<Value, RpcError> {
        only(p, &["profile", "contact", "limit"])?;
        let contact = req_str(p, "contact")?;
        let limit = opt_u64(p, "limit")?
            .unwrap_or(50)
            .min(super::MAX_LOG as u64) as usize;
        let (_, r) = self.ready(p)?;
        Ok(Value::Array(crate::cli::log::messages(
            &r.client(),
            contact,
            limit,
        )?))
    }
}
