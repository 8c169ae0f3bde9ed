//! APPLICATION registrations: a client-id record whose `client_type` is `application` makes
//! that client id an APPLICATION client (when its credential does not decide the type). The
//! admin CLI (`ferrymq app-clients …`) and the admin API (`/api/v1/application-clients`) both go
//! through here, on any [`CredentialStore`].
//!
//! Registering keeps an existing client-id credential (its password and ACL) and only sets its
//! type; unregistering deletes a bare registration but only clears the type of a credential that
//! has a password or ACL of its own. Each is a read followed by a write: two admins changing the
//! same client id at the same instant may overwrite each other's change to that record.

use super::acl::AclRules;
use super::store::{ClientType, CredentialKey, CredentialRecord, CredentialStore, StoreError};

/// Whether the record is an APPLICATION registration (a client-id record of that type).
pub fn is_registration(record: &CredentialRecord) -> bool {
    record.username.is_none()
        && record.client_id.is_some()
        && record.client_type == Some(ClientType::Application)
}

/// Makes `client_id` an APPLICATION client; `false` when it already was one.
pub async fn register(store: &dyn CredentialStore, client_id: &str) -> Result<bool, StoreError> {
    let key = CredentialKey::ClientId(client_id.to_string());
    let record = match store.get(&key).await? {
        Some(r) if r.client_type == Some(ClientType::Application) => return Ok(false),
        Some(r) => CredentialRecord {
            client_type: Some(ClientType::Application),
            ..r
        },
        None => CredentialRecord {
            username: None,
            client_id: Some(client_id.to_string()),
            password_hash: None,
            client_type: Some(ClientType::Application),
            acl: AclRules::default(),
        },
    };
    store.put(record).await?;
    Ok(true)
}

/// Ends the registration of `client_id`; `false` when it was not registered.
pub async fn unregister(store: &dyn CredentialStore, client_id: &str) -> Result<bool, StoreError> {
    let key = CredentialKey::ClientId(client_id.to_string());
    match store.get(&key).await? {
        Some(r) if r.client_type == Some(ClientType::Application) => {
            if r.password_hash.is_none() && r.acl == AclRules::default() {
                store.delete(&key).await?;
            } else {
                // A credential in its own right: only the registration goes.
                store
                    .put(CredentialRecord {
                        client_type: None,
                        ..r
                    })
                    .await?;
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Up to `limit` registered client ids after `after`, in order, and whether more may follow.
/// Reads the client-id records page by page (they sort before every user record) and stops
/// at the first user record.
pub async fn list(
    store: &dyn CredentialStore,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<String>, bool), StoreError> {
    const SCAN_PAGE: usize = 1000;
    let mut cursor = after.map(|a| CredentialKey::ClientId(a.to_string()));
    let mut out = Vec::new();
    loop {
        let page = store.list(cursor.as_ref(), SCAN_PAGE).await?;
        let full = page.len() == SCAN_PAGE;
        for record in page {
            let Some(key) = record.key() else { continue };
            if matches!(key, CredentialKey::Username(_)) {
                return Ok((out, false));
            }
            if is_registration(&record) {
                if out.len() == limit {
                    return Ok((out, true));
                }
                if let Some(id) = record.client_id {
                    out.push(id);
                }
            }
            cursor = Some(key);
        }
        if !full {
            return Ok((out, false));
        }
    }
}
