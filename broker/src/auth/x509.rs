//! X.509 client certificates: the subject CN of a certificate the TLS listener verified is
//! mapped to a name and looked up in the credential store (docs/security.md, "X.509 mapping").
//!
//! The certificate is the proof, so the record's password is not asked for. A certificate
//! whose CN does not match the pattern, or whose name has no record, is not this provider's:
//! the next provider (or the anonymous rule) decides.

use regex::Regex;

use crate::config::{X509Config, X509Lookup};

use super::store::CredentialKey;

pub struct X509Mapper {
    regex: Option<Regex>,
    lookup: X509Lookup,
}

impl X509Mapper {
    pub fn new(config: &X509Config) -> Result<X509Mapper, regex::Error> {
        let regex = if config.cn_regex.is_empty() {
            None
        } else {
            // Anchored: the pattern must describe the whole CN, not some part of it.
            Some(Regex::new(&format!("^(?:{})$", config.cn_regex))?)
        };
        Ok(X509Mapper {
            regex,
            lookup: config.lookup,
        })
    }

    /// The store key a subject CN maps to, if it maps at all.
    pub fn key_for(&self, cn: &str) -> Option<CredentialKey> {
        let name = match &self.regex {
            None => cn.to_string(),
            Some(re) => {
                let caps = re.captures(cn)?;
                caps.name("name")
                    .or_else(|| caps.get(1))
                    .or_else(|| caps.get(0))?
                    .as_str()
                    .to_string()
            }
        };
        if name.is_empty() {
            return None;
        }
        Some(match self.lookup {
            X509Lookup::Username => CredentialKey::Username(name),
            X509Lookup::ClientId => CredentialKey::ClientId(name),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapper(re: &str, lookup: X509Lookup) -> X509Mapper {
        X509Mapper::new(&X509Config {
            cn_regex: re.into(),
            lookup,
        })
        .unwrap()
    }

    #[test]
    fn exact_and_regex_mapping() {
        let m = mapper("", X509Lookup::Username);
        assert_eq!(
            m.key_for("device-7"),
            Some(CredentialKey::Username("device-7".into()))
        );
        let m = mapper(r"device-(\d+)\.example\.com", X509Lookup::ClientId);
        assert_eq!(
            m.key_for("device-42.example.com"),
            Some(CredentialKey::ClientId("42".into()))
        );
        // Anchored: a CN that merely contains a match does not map.
        assert_eq!(m.key_for("evil-device-42.example.com.attacker"), None);
        let m = mapper(r"(?P<name>[a-z]+)@corp", X509Lookup::Username);
        assert_eq!(
            m.key_for("bob@corp"),
            Some(CredentialKey::Username("bob".into()))
        );
        let m = mapper(r"x(\d*)", X509Lookup::Username);
        assert_eq!(m.key_for("x"), None);
    }
}
