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
    let contact = client.contact(&id)?;
    // With several devices, the contact is known by the code of the first
    // connection; the others were introduced through it.
    let Some(ours) = contact.code().map(|c| c.code) else {
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
            line(&ours);
            Ok(())
        }
        Some(theirs) => {
            if !codes_match(&ours, theirs) {
                return Err(fail(
                    CODE_MISMATCH,
                    format!(
                        "SECURITY CODES DIFFER for {}: the connection may be intercepted. Do not trust it; \
                         make a new invitation in person",
                        args.contact
                    ),
                ));
            }
            for m in client.group_members(&id)? {
                client.update_contact(&m, |_, c| {
                    match &mut c.root_code {
                        Some(r) => r.verified = true,
                        None => c.conn.verified = true,
                    }
                    Ok(())
                })?;
            }
            note(&format!("codes match: {} is verified", args.contact));
            Ok(())
        }
    }
}
