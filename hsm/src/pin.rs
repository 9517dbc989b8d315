//! The user PIN, held in zeroizing memory and never printed.

use std::fmt;
use std::path::PathBuf;

use zeroize::Zeroizing;

use crate::{Error, Result};

/// A token PIN. Its memory is wiped on drop and its `Debug` prints `"..."`.
#[derive(Clone)]
pub struct Pin(Zeroizing<String>);

impl Pin {
    /// Wraps a PIN.
    pub fn new(pin: String) -> Self {
        Pin(Zeroizing::new(pin))
    }

    pub(crate) fn auth_pin(&self) -> cryptoki::types::AuthPin {
        cryptoki::types::AuthPin::from(self.0.as_str())
    }

    /// The PIN's characters, for the rare caller that must hand them on (token creation).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(...)")
    }
}

/// Where the PIN comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file whose first line is the PIN; refused when group or others may read it.
    File(PathBuf),
    /// An environment variable holding the PIN.
    Env(String),
}

impl PinSource {
    /// Reads the PIN. A file readable by group or others is refused.
    pub fn read(&self) -> Result<Pin> {
        match self {
            PinSource::File(path) => {
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    let meta = std::fs::metadata(path)
                        .map_err(|e| Error::Pin(format!("{}: {e}", path.display())))?;
                    let mode = meta.permissions().mode();
                    if mode & 0o077 != 0 {
                        return Err(Error::Pin(format!(
                            "{} is readable by group or others (mode {:o}); chmod 600 it",
                            path.display(),
                            mode & 0o777
                        )));
                    }
                }
                let text = Zeroizing::new(
                    std::fs::read_to_string(path)
                        .map_err(|e| Error::Pin(format!("{}: {e}", path.display())))?,
                );
                let pin = text.lines().next().unwrap_or("").trim_end_matches('\r');
                if pin.is_empty() {
                    return Err(Error::Pin(format!("{} is empty", path.display())));
                }
                Ok(Pin::new(pin.to_owned()))
            }
            PinSource::Env(name) => {
                let value =
                    Zeroizing::new(std::env::var(name).map_err(|_| {
                        Error::Pin(format!("environment variable {name} is not set"))
                    })?);
                if value.is_empty() {
                    return Err(Error::Pin(format!("environment variable {name} is empty")));
                }
                Ok(Pin::new(value.as_str().to_owned()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_pin() {
        let pin = Pin::new("123456-secret".into());
        assert_eq!(format!("{pin:?}"), "Pin(...)");
    }

    #[test]
    fn world_readable_pin_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "1234\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = PinSource::File(path.clone()).read().unwrap_err();
        assert!(
            err.to_string().contains("readable by group or others"),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(PinSource::File(path).read().unwrap().expose(), "1234");
    }
}
