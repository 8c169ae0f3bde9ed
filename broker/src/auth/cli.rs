//! `ferrymq credentials …` and `ferrymq app-clients …`: edit the credential store the
//! configuration names, for users without the operator or the admin API: the PostgreSQL table
//! with `storage.backend = "kafka+postgres"` (works while brokers run), else the embedded store
//! of the data directory.
//!
//! The embedded store file is locked while a broker runs on the same data directory; the
//! commands then fail with a message naming the lock (use the running broker's admin API).

use std::io::BufRead;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};

use super::acl::AclRules;
use super::applications;
use super::chain::open_store;
use super::password;
use super::store::{ClientType, CredentialKey, CredentialRecord, CredentialStore, MAX_LIST};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Manage credentials (user name or client id, password, client type, ACL).
    #[command(subcommand)]
    Credentials(CredentialsCommand),
    /// Register APPLICATION clients by client id.
    #[command(subcommand)]
    AppClients(AppClientsCommand),
}

#[derive(Debug, Subcommand)]
pub enum CredentialsCommand {
    /// Add a credential, or replace the one with the same user name (or client id).
    Add(AddArgs),
    /// Print every credential as one JSON object per line (password hashes left out).
    List,
    /// Delete a credential.
    Delete(KeyArgs),
}

#[derive(Debug, Subcommand)]
pub enum AppClientsCommand {
    /// Make CLIENT_ID an APPLICATION client.
    Add { client_id: String },
    /// Print the registered APPLICATION client ids, one per line.
    List,
    /// Make CLIENT_ID a DEVICE client again (unless the config lists it).
    Delete { client_id: String },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TypeArg {
    Device,
    Application,
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The user name of the credential.
    #[arg(
        long,
        conflicts_with = "client_id",
        required_unless_present = "client_id"
    )]
    pub username: Option<String>,
    /// The client id of a credential that has no user name.
    #[arg(long)]
    pub client_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// User name to log in with. With --client-id too, the user may connect only as that id.
    #[arg(long, required_unless_present = "client_id")]
    pub username: Option<String>,
    /// Client id (alone: a client-id credential; with --username: the only id allowed).
    #[arg(long)]
    pub client_id: Option<String>,
    /// Read the password from the first line of standard input.
    #[arg(long, group = "secret")]
    pub password_stdin: bool,
    /// Read the password from this environment variable.
    #[arg(long, value_name = "VAR", group = "secret")]
    pub password_env: Option<String>,
    /// Store this existing argon2id or bcrypt hash (imports).
    #[arg(long, value_name = "HASH", group = "secret")]
    pub password_hash: Option<String>,
    /// Client type; without it the APPLICATION registrations and the config decide.
    #[arg(long = "type", value_enum)]
    pub client_type: Option<TypeArg>,
    /// Topic pattern the client may publish to (repeat; ${client_id}, ${username} allowed).
    #[arg(long = "pub", value_name = "PATTERN")]
    pub publish: Vec<String>,
    /// Topic pattern the client may subscribe to (repeat).
    #[arg(long = "sub", value_name = "PATTERN")]
    pub subscribe: Vec<String>,
}

/// Runs one admin command against the configured backend's credential store: the table
/// `mqtt_credentials` with `storage.backend = "kafka+postgres"`, else
/// `<data_dir>/credentials.redb`.
pub fn run(command: AdminCommand, config: &Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let store = open_store(config).await?;
        match command {
            AdminCommand::Credentials(c) => credentials(store.as_ref(), c).await,
            AdminCommand::AppClients(c) => app_clients(store.as_ref(), c).await,
        }
    })
}

async fn credentials(
    store: &dyn CredentialStore,
    command: CredentialsCommand,
) -> anyhow::Result<()> {
    match command {
        CredentialsCommand::Add(args) => {
            let password_hash = match (&args.password_hash, &args.password_env) {
                (Some(hash), _) => Some(hash.clone()),
                (None, Some(var)) => {
                    let pw = std::env::var(var)
                        .with_context(|| format!("environment variable {var} is not set"))?;
                    Some(hash_nonempty(pw.as_bytes())?)
                }
                (None, None) if args.password_stdin => {
                    let mut line = String::new();
                    std::io::stdin()
                        .lock()
                        .read_line(&mut line)
                        .context("reading the password from standard input")?;
                    let pw = line.trim_end_matches(['\n', '\r']);
                    Some(hash_nonempty(pw.as_bytes())?)
                }
                (None, None) => None,
            };
            let record = CredentialRecord {
                username: args.username,
                client_id: args.client_id,
                password_hash,
                client_type: args.client_type.map(|t| match t {
                    TypeArg::Device => ClientType::Device,
                    TypeArg::Application => ClientType::Application,
                }),
                acl: AclRules {
                    publish: args.publish,
                    subscribe: args.subscribe,
                },
            };
            let key = record.key();
            store.put(record).await?;
            if let Some(key) = key {
                println!("stored {key}");
            }
            Ok(())
        }
        CredentialsCommand::List => {
            for_each(store, |record| {
                println!("{}", record.redacted());
                Ok(())
            })
            .await
        }
        CredentialsCommand::Delete(args) => {
            let key = match (args.username, args.client_id) {
                (Some(u), _) => CredentialKey::Username(u),
                (None, Some(c)) => CredentialKey::ClientId(c),
                (None, None) => bail!("give --username or --client-id"),
            };
            if !store.delete(&key).await? {
                bail!("no credential with {key}");
            }
            println!("deleted {key}");
            Ok(())
        }
    }
}

fn hash_nonempty(password: &[u8]) -> anyhow::Result<String> {
    if password.is_empty() {
        bail!("the password is empty");
    }
    password::hash(password).map_err(|e| anyhow::anyhow!("hashing the password: {e}"))
}

async fn app_clients(
    store: &dyn CredentialStore,
    command: AppClientsCommand,
) -> anyhow::Result<()> {
    match command {
        AppClientsCommand::Add { client_id } => {
            applications::register(store, &client_id).await?;
            println!("client id `{client_id}` is an APPLICATION client");
            Ok(())
        }
        AppClientsCommand::List => {
            for_each(store, |record| {
                if applications::is_registration(record) {
                    if let Some(id) = &record.client_id {
                        println!("{id}");
                    }
                }
                Ok(())
            })
            .await
        }
        AppClientsCommand::Delete { client_id } => {
            if !applications::unregister(store, &client_id).await? {
                bail!("client id `{client_id}` is not registered as an APPLICATION client");
            }
            println!("client id `{client_id}` is no longer registered as an APPLICATION client");
            Ok(())
        }
    }
}

/// Visits every record, page by page.
async fn for_each(
    store: &dyn CredentialStore,
    mut f: impl FnMut(&CredentialRecord) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut after: Option<CredentialKey> = None;
    loop {
        let page = store.list(after.as_ref(), MAX_LIST).await?;
        for record in &page {
            f(record)?;
        }
        if page.len() < MAX_LIST {
            return Ok(());
        }
        after = page.last().and_then(|r| r.key());
    }
}
