//! `tern verify`: compare security codes out of band.

use super::exit::{fail, CODE_MISMATCH, USAGE};
use super::output::{line, note, stdout_is_terminal};
use super::{qr, unlock, Cli};
use crate::proto::security_code::codes_match;

/// Show a contact's security code, or compare it with theirs
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern verify bob                       # show the code (and its QR code)\n  tern verify bob '12345 67890 …'        # compare with the code Bob reads out\n\nA mismatch exits with status 4: someone may have swapped the invitation."
)]
pub struct Args {
    pub contact: String,
    /// The code the contact sees; spaces and dashes are ignored
    pub code: Option<String>,
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let mut client = unlock::open(cli)?;
    let id = client.contact_id(&args.contact)?;
    // Each connection of the contact (one per device of theirs) has its
    // own code, the same at both of its ends; this device knows only its
    // own (PROTOCOL.md §12.7).
    let mut codes: Vec<(String, String)> = Vec::new();
    for m in client.group_members(&id)? {
        let c = client.contact(&m)?;
        if let Some(code) = c.code().map(|c| c.code) {
            codes.push((m, code));
        }
    }
    let Some((_, ours)) = codes.first().cloned() else {
        return Err(fail(
            USAGE,
            format!(
                "{} has not accepted the invitation yet: no code to compare",
                args.contact
            ),
        ));
    };
    match &args.code {
        None => {
            if stdout_is_terminal() {
                print!(
                    "{}",
                    qr::terminal(
                        &format!("TERN-CODE:{}", ours.replace(' ', "")),
                        std::env::var_os("NO_COLOR").is_none()
                    )?
                );
            }
            for (_, code) in &codes {
                line(code);
            }
            if codes.len() > 1 {
                note(&format!(
                    "one code per device of {} connected with this device: the code their \
                     device shows must be one of these",
                    args.contact
                ));
            }
            Ok(())
        }
        Some(theirs) => {
            let matching: Vec<&String> = codes
                .iter()
                .filter(|(_, code)| codes_match(code, theirs))
                .map(|(m, _)| m)
                .collect();
            if matching.is_empty() {
                return Err(fail(
                    CODE_MISMATCH,
                    format!(
                        "SECURITY CODES DIFFER for {}: the connection may be intercepted. Do not trust it; \
                         make a new invitation in person",
                        args.contact
                    ),
                ));
            }
            for m in matching {
                client.update_contact(m, |_, c| {
                    c.conn.verified = true;
                    Ok(())
                })?;
            }
            note(&format!("codes match: {} is verified", args.contact));
            Ok(())
        }
    }
}
