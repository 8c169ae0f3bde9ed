//! A private Kubernetes control plane for tests, as controller-runtime's envtest runs one: etcd,
//! kube-apiserver and (when asked for) kube-controller-manager as child processes on free
//! loopback ports, in a temporary directory, stopped when dropped.
//!
//! The binaries come from `e2e/services/k8s/install.sh`, which builds them from the Go module
//! proxy and caches them under `${FERRYMQ_CACHE:-$HOME/.cache/ferrymq}/k8s-<version>/`;
//! `FERRYMQ_K8S_BIN` points at another directory holding `etcd`, `kube-apiserver` and
//! `kube-controller-manager`. Tests call [`require_control_plane`] first: without the binaries
//! they are skipped with a message, unless `FERRYMQ_REQUIRE_SERVICES=1` (set by `.ci/run`).
//!
//! What the API server gets:
//! * authentication: a static token file with one admin token (group `system:masters`), and
//!   ServiceAccount tokens signed with an RSA key made here with `openssl`, so a test can act
//!   as a ServiceAccount through the TokenRequest API ([`ControlPlane::service_account_token`]);
//! * authorization: `RBAC` only, so a ServiceAccount without a rule gets a 403;
//! * its own self-signed serving certificate (`--cert-dir`); clients skip verification, which is
//!   fine on loopback in a test and saves a CA.
//!
//! There is no kubelet and no scheduler: Pods stay Pending. A test that needs Pods running sets
//! their status itself ([`set_pod_ready`]) and says so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};

use super::process::free_port;
use super::services::REQUIRE_ENV;

/// Overrides the directory holding `etcd`, `kube-apiserver` and `kube-controller-manager`.
pub const K8S_BIN_ENV: &str = "FERRYMQ_K8S_BIN";
/// The Kubernetes release `install.sh` builds (`e2e/services/k8s/VERSION`).
pub const K8S_VERSION: &str = include_str!("../../services/k8s/VERSION");
/// The admin's bearer token (static token file; group `system:masters`).
pub const ADMIN_TOKEN: &str = "ferrymq-e2e-admin-token";

const BINARIES: [&str; 3] = ["etcd", "kube-apiserver", "kube-controller-manager"];

/// Where the control-plane binaries are: `FERRYMQ_K8S_BIN`, else install.sh's cache directory.
pub fn k8s_bin_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os(K8S_BIN_ENV) {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = match std::env::var_os("FERRYMQ_CACHE") {
                Some(c) => PathBuf::from(c),
                None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/ferrymq"),
            };
            cache.join(format!("k8s-{}", K8S_VERSION.trim()))
        }
    };
    BINARIES
        .iter()
        .all(|b| dir.join(b).is_file())
        .then_some(dir)
}

/// Whether a control plane can run here. `false` means "skip" (a message was printed); with
/// `FERRYMQ_REQUIRE_SERVICES=1` missing binaries panic instead.
pub fn require_control_plane() -> bool {
    if k8s_bin_dir().is_some() {
        return true;
    }
    let message = format!(
        "this test needs a Kubernetes control plane (etcd, kube-apiserver, \
         kube-controller-manager {}): run `bash e2e/services/k8s/install.sh` or set {K8S_BIN_ENV}",
        K8S_VERSION.trim()
    );
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{message} ({REQUIRE_ENV}=1)");
    }
    eprintln!("SKIPPED: {message}; set {REQUIRE_ENV}=1 to make this a failure");
    false
}

/// What to start besides etcd and kube-apiserver.
#[derive(Clone, Copy, Debug, Default)]
pub struct ControlPlaneOptions {
    /// Also run kube-controller-manager: garbage collection through owner references,
    /// StatefulSet → Pods, PodDisruptionBudget status, ServiceAccount token controller.
    pub controller_manager: bool,
}

/// etcd + kube-apiserver (+ kube-controller-manager), killed on drop.
pub struct ControlPlane {
    dir: tempfile::TempDir,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    controller_manager: Option<Child>,
    /// `https://127.0.0.1:<port>`
    pub url: String,
    /// A kubeconfig for the admin (token auth, namespace `default`).
    pub kubeconfig: PathBuf,
}

fn spawn_logged(mut cmd: Command, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out));
    // Its own process group, so that a Ctrl-C of `cargo test` does not race the Drop below and
    // so `kill` reaches exactly this child.
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    cmd.spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))
}

fn openssl(args: &[&str], dir: &Path) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl (apt-get install openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A kubeconfig for `url` that authenticates with `token`.
pub fn kubeconfig_yaml(url: &str, token: &str, namespace: &str) -> String {
    // JSON is YAML; serde_json quotes everything correctly.
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": url, "insecure-skip-tls-verify": true}}],
        "users": [{"name": "e2e", "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e", "namespace": namespace}}],
        "current-context": "e2e",
    })
    .to_string()
}

impl ControlPlane {
    pub async fn start(opts: ControlPlaneOptions) -> anyhow::Result<ControlPlane> {
        // The test process's TLS provider: a workspace test build compiles in both of rustls'
        // providers, and then rustls cannot pick one for the kube client. (Already installed:
        // fine.)
        let _ = rustls::crypto::ring::default_provider().install_default();
        let bin = k8s_bin_dir().context("control-plane binaries not found")?;
        let dir = tempfile::Builder::new().prefix("ferrymq-k8s-").tempdir()?;
        let d = dir.path();

        // ServiceAccount token signing key pair.
        openssl(&["genrsa", "-out", "sa.key", "2048"], d)?;
        openssl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"], d)?;
        std::fs::write(
            d.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin-uid,\"system:masters\"\n"),
        )?;

        let etcd_client = free_port()?;
        let etcd_peer = free_port()?;
        let mut etcd = Command::new(bin.join("etcd"));
        etcd.arg(format!("--data-dir={}", d.join("etcd").display()))
            .arg(format!("--listen-client-urls=http://{etcd_client}"))
            .arg(format!("--advertise-client-urls=http://{etcd_client}"))
            .arg(format!("--listen-peer-urls=http://{etcd_peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://{etcd_peer}"))
            .arg(format!("--initial-cluster=default=http://{etcd_peer}"))
            // Test data: no fsync, no snapshots worth keeping.
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        let mut cp = ControlPlane {
            url: String::new(),
            kubeconfig: d.join("admin.kubeconfig"),
            etcd: Some(spawn_logged(etcd, &d.join("etcd.log"))?),
            apiserver: None,
            controller_manager: None,
            dir,
        };
        let d = cp.dir.path().to_path_buf();
        cp.wait_port(etcd_client, "etcd", Duration::from_secs(30))?;

        let port = free_port()?;
        cp.url = format!("https://{port}");
        let mut api = Command::new(bin.join("kube-apiserver"));
        api.arg(format!("--etcd-servers=http://{etcd_client}"))
            .arg(format!("--cert-dir={}", d.join("certs").display()))
            .arg(format!("--secure-port={}", port.port()))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!(
                "--service-account-key-file={}",
                d.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d.join("sa.key").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--allow-privileged=true")
            // Events and leases at test speed; no need for the default 1 h event TTL.
            .arg("--event-ttl=10m")
            .arg("--v=1");
        cp.apiserver = Some(spawn_logged(api, &d.join("kube-apiserver.log"))?);
        std::fs::write(
            &cp.kubeconfig,
            kubeconfig_yaml(&cp.url, ADMIN_TOKEN, "default"),
        )?;
        cp.wait_ready(Duration::from_secs(120)).await?;

        if opts.controller_manager {
            let mut kcm = Command::new(bin.join("kube-controller-manager"));
            kcm.arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
                .arg("--leader-elect=false")
                .arg("--bind-address=127.0.0.1")
                .arg(format!("--secure-port={}", free_port()?.port()))
                .arg(format!(
                    "--service-account-private-key-file={}",
                    d.join("sa.key").display()
                ))
                .arg("--controllers=*")
                // Garbage collection at test speed.
                .arg("--concurrent-gc-syncs=5")
                .arg("--v=1");
            cp.controller_manager =
                Some(spawn_logged(kcm, &d.join("kube-controller-manager.log"))?);
        }
        Ok(cp)
    }

    fn wait_port(
        &mut self,
        addr: std::net::SocketAddr,
        what: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!("{what} did not listen on {addr} within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fails if a child exited, with the tail of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path().to_path_buf();
        for (child, name) in [
            (&mut self.etcd, "etcd"),
            (&mut self.apiserver, "kube-apiserver"),
            (&mut self.controller_manager, "kube-controller-manager"),
        ] {
            if let Some(c) = child {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!(
                        "{name} exited ({status}):\n{}",
                        tail(&d.join(format!("{name}.log")), 30)
                    );
                }
            }
        }
        Ok(())
    }

    /// Waits until `/readyz` answers 200 (which includes etcd and the post-start hooks that
    /// create the default RBAC roles and the `default` namespace).
    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let client = self.client().await?;
        loop {
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .context("building /readyz")?;
            let last = match client.request_text(req).await {
                Ok(body) if body.trim() == "ok" => break,
                Ok(body) => body,
                Err(e) => e.to_string(),
            };
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready within {timeout:?}: {last}\n{}",
                    tail(&self.dir.path().join("kube-apiserver.log"), 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // The `default` namespace comes from a controller inside the API server, a moment
        // after readiness.
        let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
        while ns.get_opt("default").await?.is_none() {
            if Instant::now() > deadline {
                bail!("namespace default not created within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// A client authenticated as the admin.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        self.client_with_token(ADMIN_TOKEN).await
    }

    /// A client authenticated by `token` (e.g. a ServiceAccount's).
    pub async fn client_with_token(&self, token: &str) -> anyhow::Result<kube::Client> {
        let kubeconfig: kube::config::Kubeconfig =
            serde_json::from_str(&kubeconfig_yaml(&self.url, token, "default"))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .context("kubeconfig")?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Writes a kubeconfig authenticating with `token` into the control plane's directory and
    /// returns its path (for a child process's `KUBECONFIG`).
    pub fn write_kubeconfig(&self, name: &str, token: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        std::fs::write(&path, kubeconfig_yaml(&self.url, token, "default"))?;
        Ok(path)
    }

    /// A bearer token for ServiceAccount `namespace/name` from the TokenRequest API (signed by
    /// this control plane's key; valid one hour). The ServiceAccount must exist.
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<String> {
        use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
        use k8s_openapi::api::core::v1::ServiceAccount;
        let api: Api<ServiceAccount> = Api::namespaced(self.client().await?, namespace);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let out = api
            .create_token_request(name, &Default::default(), &req)
            .await
            .with_context(|| format!("TokenRequest for {namespace}/{name}"))?;
        out.status
            .map(|s| s.token)
            .context("TokenRequest returned no status")
    }

    /// The control plane's temporary directory (logs, keys, kubeconfigs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of one component's log (`etcd`, `kube-apiserver`,
    /// `kube-controller-manager`).
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        tail(&self.dir.path().join(format!("{component}.log")), lines)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for c in ["kube-controller-manager", "kube-apiserver", "etcd"] {
                eprintln!("--- {c} log (tail) ---\n{}", self.log_tail(c, 15));
            }
        }
        // Reverse start order: the API server's clients first, etcd last.
        for child in [
            &mut self.controller_manager,
            &mut self.apiserver,
            &mut self.etcd,
        ] {
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::env::var_os(super::KEEP_ENV).is_some() {
            // Leak the directory on purpose: logs and kubeconfigs stay for a look.
            let path = self.dir.path().to_path_buf();
            std::mem::forget(std::mem::replace(
                &mut self.dir,
                match tempfile::Builder::new().prefix("ferrymq-k8s-").tempdir() {
                    Ok(d) => d,
                    Err(_) => return,
                },
            ));
            eprintln!("kept {}", path.display());
        }
    }
}

/// Sets Pod `namespace/name` Running and Ready through the status subresource, as a kubelet
/// would. There is no kubelet in this control plane, so tests that need ready pods call this and
/// say so.
pub async fn set_pod_ready(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let now = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let patch = serde_json::json!({
        "status": {
            "phase": "Running",
            "podIP": "10.1.0.1",
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
            ],
        }
    });
    api.patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .with_context(|| format!("setting Pod {namespace}/{name} ready"))?;
    Ok(())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
