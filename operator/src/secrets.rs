//! Reading Secrets, generating passwords, and building connection URLs.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

/// The Secret's data as text (keys whose value is not UTF-8 are left out: every value the
/// operator reads is a URL, a password or a librdkafka property).
pub fn string_data(secret: &Secret) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = secret
        .data
        .iter()
        .flatten()
        .filter_map(|(k, v)| String::from_utf8(v.0.clone()).ok().map(|v| (k.clone(), v)))
        .collect();
    // stringData is write-only on a real API server, but objects built in memory carry it.
    out.extend(secret.string_data.clone().unwrap_or_default());
    out
}

/// `key` of Secret `name`, or `None` when the Secret or the key is missing.
pub async fn read_key(
    api: &Api<Secret>,
    name: &str,
    key: &str,
) -> Result<Option<String>, kube::Error> {
    Ok(api
        .get_opt(name)
        .await?
        .and_then(|s| string_data(&s).remove(key))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty()))
}

/// 32 random alphanumeric characters (about 190 bits), safe in URLs and MQTT clients.
pub fn generate_password() -> Result<String, getrandom::Error> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(32);
    while out.len() < 32 {
        let mut buf = [0u8; 64];
        getrandom::getrandom(&mut buf)?;
        // Rejection sampling: 62 * 4 = 248, so bytes >= 248 would bias the result.
        for b in buf.into_iter().filter(|b| *b < 248) {
            if out.len() == 32 {
                break;
            }
            out.push(char::from(ALPHABET[usize::from(b % 62)]));
        }
    }
    Ok(out)
}

/// `admin_url` with the user name and password replaced: the broker role's URL on the same
/// server and database, with the same parameters (sslmode…).
pub fn login_url(admin_url: &str, user: &str, password: &str) -> Result<String, String> {
    let mut url = url::Url::parse(admin_url).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(format!("scheme `{}` is not postgres", url.scheme()));
    }
    url.set_username(user)
        .map_err(|()| "the URL cannot carry a user name".to_string())?;
    url.set_password(Some(password))
        .map_err(|()| "the URL cannot carry a password".to_string())?;
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_long_random_and_alphanumeric() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    #[test]
    fn login_url_keeps_host_database_and_parameters() {
        let url = login_url(
            "postgres://admin:secret@db:5432/app?sslmode=require",
            "ferrymq_broker",
            "pw",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://ferrymq_broker:pw@db:5432/app?sslmode=require"
        );
        assert!(login_url("mysql://x@y/z", "a", "b").is_err());
        assert!(login_url("not a url", "a", "b").is_err());
    }
}
