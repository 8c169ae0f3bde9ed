//! The real `ferrymq-operator` binary, run as the chart deploys it, against a real kube-apiserver
//! (e2e/src/harness/kube.rs):
//! * the chart is rendered with helm-python-sdk (charts/render.py); its ServiceAccount and RBAC
//!   objects are applied; the operator runs with exactly the rendered Deployment's args and env
//!   (the kubelet's part, the downward-API values, filled in by the test) and authenticates as
//!   that ServiceAccount with a token, so a rule the chart lacks shows up as a 403;
//! * leader election on: two processes, only the Lease holder reconciles; killing it hands the
//!   Lease to the other within the lease duration; SIGTERM releases it;
//! * leader election off: SIGTERM lets the reconcile in flight finish before the process exits.
//!
//! Skipped where the control-plane binaries are missing (`bash e2e/services/k8s/install.sh`),
//! unless `FERRYMQ_REQUIRE_SERVICES=1`.

mod k8s;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrymq_crds::MqttBroker;
use ferrymq_e2e::harness::free_port;
use ferrymq_e2e::harness::kube::ControlPlane;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use serde_json::{json, Value};

use k8s::{apply_crds, control_plane, create, create_namespace, render_chart, runtime, wait_for};

const RELEASE_NS: &str = "ferrymq-system";
const LEASE: &str = "fmq-ferrymq-operator-leader";

fn objects_of<'a>(rendered: &'a Value, kind: &str) -> Vec<&'a Value> {
    rendered["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .filter(|o| o["kind"] == kind)
        .collect()
}

/// Applies the chart's ServiceAccount and RBAC objects (what `helm install` creates besides the
/// Deployment and Service, which need a kubelet) and returns a kubeconfig authenticating as
/// that ServiceAccount.
async fn install_chart_identity(cp: &ControlPlane, rendered: &Value) -> PathBuf {
    let client = cp.client().await.expect("client");
    create_namespace(&client, RELEASE_NS).await;
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ] {
        for obj in objects_of(rendered, kind) {
            match create(&client, obj, RELEASE_NS).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => panic!("applying the chart's {kind}: {e}"),
            }
        }
    }
    let sa = objects_of(rendered, "ServiceAccount")[0]["metadata"]["name"]
        .as_str()
        .expect("ServiceAccount name")
        .to_string();
    let token = cp
        .service_account_token(RELEASE_NS, &sa)
        .await
        .expect("ServiceAccount token");
    cp.write_kubeconfig(&format!("sa-{sa}"), &token)
        .expect("kubeconfig")
}

/// A `ferrymq-operator` process started from the rendered Deployment.
struct Operator {
    child: Option<Child>,
    http: u16,
    log: PathBuf,
    name: String,
}

impl Operator {
    /// Starts the binary with the Deployment's container args and env. `valueFrom` entries are
    /// what the kubelet would fill in (pod name and namespace); nothing else is added besides
    /// KUBECONFIG (the ServiceAccount's token, where a pod would have its mounted token).
    fn start(rendered: &Value, kubeconfig: &Path, pod: &str, dir: &Path) -> Operator {
        let deployment = objects_of(rendered, "Deployment")[0];
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<String> = container["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a.as_str().expect("string arg").to_string())
            .collect();
        let http = container["ports"][0]["containerPort"]
            .as_u64()
            .expect("port") as u16;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrymq-operator"));
        cmd.args(&args)
            .env_remove("RUST_LOG")
            .env("KUBECONFIG", kubeconfig);
        for e in container["env"].as_array().expect("env") {
            let name = e["name"].as_str().expect("env name");
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else {
                match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("metadata.name") => pod.to_string(),
                    Some("metadata.namespace") => RELEASE_NS.to_string(),
                    other => panic!("env {name}: no kubelet value for {other:?}"),
                }
            };
            cmd.env(name, value);
        }
        let log = dir.join(format!("operator-{pod}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        cmd.stdout(Stdio::from(out.try_clone().expect("log")))
            .stderr(Stdio::from(out))
            .stdin(Stdio::null());
        let child = cmd.spawn().expect("starting ferrymq-operator");
        eprintln!("started {pod} (pid {}): {args:?}", child.id());
        Operator {
            child: Some(child),
            http,
            log,
            name: pod.to_string(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET /metrics (HTTP/1.0, so the body ends with the connection).
    fn metrics(&self) -> String {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.http)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// The value of a metric line starting with `prefix` (0 when absent).
    fn metric(&self, prefix: &str) -> f64 {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// Waits for the process to exit; panics after `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not exit within {timeout:?}; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A denied API call shows as `reason: "Forbidden", code: 403` in kube's error. A bare
    /// "403" is not searched for: it occurs in log timestamps (`20.540385Z` failed a CI run).
    fn assert_no_forbidden(&self) {
        let log = self.log();
        assert!(
            !log.contains("code: 403") && !log.contains("orbidden"),
            "{}: the chart's RBAC is missing a rule:\n{log}",
            self.name
        );
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.log());
        }
    }
}

fn embedded_broker(name: &str) -> Value {
    json!({
        "apiVersion": "ferrymq.io/v1alpha1",
        "kind": "MqttBroker",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"image": "ferrymq:test", "storage": {"embedded": {}}},
    })
}

async fn lease_holder(api: &Api<Lease>) -> Option<String> {
    api.get_opt(LEASE)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

async fn wait_reconciled(client: &kube::Client, name: &str) {
    let brokers: Api<MqttBroker> = Api::namespaced(client.clone(), "default");
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    wait_for(
        &format!("{name} reconciled (StatefulSet and status)"),
        Duration::from_secs(60),
        || {
            let (brokers, sts) = (brokers.clone(), sts.clone());
            async move {
                sts.get_opt(name).await.ok()??;
                let b = brokers.get(name).await.ok()?;
                (b.status?.observed_generation == b.metadata.generation).then_some(())
            }
        },
    )
    .await;
}

#[test]
fn two_chart_operators_only_the_lease_holder_reconciles_and_hands_over() {
    runtime().block_on(async {
        let Some(cp) = control_plane(false).await else {
            return;
        };
        let port_a = free_port().expect("port").port();
        let port_b = free_port().expect("port").port();
        let Some(rendered_a) =
            render_chart(RELEASE_NS, json!({"replicas": 2, "http": {"port": port_a}}))
        else {
            return;
        };
        let rendered_b = render_chart(RELEASE_NS, json!({"replicas": 2, "http": {"port": port_b}}))
            .expect("chart");
        let client = cp.client().await.expect("client");
        apply_crds(&client).await;
        let kubeconfig = install_chart_identity(&cp, &rendered_a).await;

        let mut a = Operator::start(&rendered_a, &kubeconfig, "op-a", cp.dir());
        let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NS);
        let first = wait_for("a Lease holder", Duration::from_secs(30), || {
            let leases = leases.clone();
            async move { lease_holder(&leases).await }
        })
        .await;
        assert_eq!(first, "op-a");
        let mut b = Operator::start(&rendered_b, &kubeconfig, "op-b", cp.dir());

        create(&client, &embedded_broker("one"), "default")
            .await
            .expect("broker one");
        wait_reconciled(&client, "one").await;
        // b is a standby: ready, not leader, and it has reconciled nothing.
        wait_for("b serving /metrics", Duration::from_secs(30), || {
            let up = !b.metrics().is_empty();
            async move { up.then_some(()) }
        })
        .await;
        assert_eq!(a.metric("ferrymq_operator_leader "), 1.0);
        assert_eq!(b.metric("ferrymq_operator_leader "), 0.0);
        assert!(a.metric("ferrymq_operator_reconciles_total{controller=\"mqttbroker\"}") >= 1.0);
        assert_eq!(
            b.metric("ferrymq_operator_reconciles_total{controller=\"mqttbroker\"}"),
            0.0,
            "the standby reconciled"
        );
        a.assert_no_forbidden();

        // Kill the leader: b takes the Lease within the lease duration (15 s, the default the
        // chart keeps) plus one retry interval (5 s), and reconciles.
        let killed = Instant::now();
        a.signal("-KILL");
        a.wait_exit(Duration::from_secs(10));
        wait_for("b holding the Lease", Duration::from_secs(25), || {
            let leases = leases.clone();
            async move { (lease_holder(&leases).await.as_deref() == Some("op-b")).then_some(()) }
        })
        .await;
        eprintln!("takeover after {:?}", killed.elapsed());
        create(&client, &embedded_broker("two"), "default")
            .await
            .expect("broker two");
        wait_reconciled(&client, "two").await;
        assert_eq!(b.metric("ferrymq_operator_leader "), 1.0);

        // SIGTERM: b stops cleanly and gives the Lease up at once.
        b.signal("-TERM");
        let status = b.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "{status}; log:\n{}", b.log());
        assert_eq!(
            lease_holder(&leases).await,
            None,
            "the Lease was not released"
        );
        assert!(b.log().contains("released the leader Lease"), "{}", b.log());
        b.assert_no_forbidden();
    });
}

#[test]
fn without_leader_election_sigterm_lets_the_reconcile_in_flight_finish() {
    runtime().block_on(async {
        let Some(cp) = control_plane(false).await else {
            return;
        };
        let port = free_port().expect("port").port();
        let Some(rendered) = render_chart(
            RELEASE_NS,
            // logLevel reaches the operator only if the chart sets the variable it reads.
            json!({"leaderElection": {"enabled": false}, "http": {"port": port},
                   "logLevel": "info,ferrymq_operator=debug,kube_runtime=debug"}),
        ) else {
            return;
        };
        let client = cp.client().await.expect("client");
        apply_crds(&client).await;
        let kubeconfig = install_chart_identity(&cp, &rendered).await;
        let mut op = Operator::start(&rendered, &kubeconfig, "op-solo", cp.dir());

        // Reconciles at once, without a Lease.
        create(&client, &embedded_broker("solo"), "default")
            .await
            .expect("broker");
        wait_reconciled(&client, "solo").await;
        let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NS);
        assert!(leases.get_opt(LEASE).await.expect("get lease").is_none());

        // A Kafka + PostgreSQL broker whose Kafka does not answer (a closed loopback port): its
        // reconcile waits for the Kafka request timeout (about 10 s) before it writes anything.
        let closed = free_port().expect("port");
        let slow = json!({
            "apiVersion": "ferrymq.io/v1alpha1",
            "kind": "MqttBroker",
            "metadata": {"name": "slow", "namespace": "default"},
            "spec": {
                "image": "ferrymq:test",
                "storage": {"kafkaPostgres": {
                    "kafka": {"bootstrapServers": closed.to_string()},
                    "postgres": {"urlSecretRef": {"name": "pg", "key": "url"}},
                }},
            },
        });
        create(&client, &slow, "default")
            .await
            .expect("slow broker");
        // The watch delivers it within a second or two; then stop the operator mid-reconcile.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let brokers: Api<MqttBroker> = Api::namespaced(client.clone(), "default");
        assert!(
            brokers.get("slow").await.expect("slow").status.is_none(),
            "the reconcile finished before SIGTERM; the test proves nothing"
        );
        let term = Instant::now();
        op.signal("-TERM");
        let status = op.wait_exit(Duration::from_secs(40));
        eprintln!("exited {:?} after SIGTERM", term.elapsed());
        assert!(status.success(), "{status}; log:\n{}", op.log());
        let b = brokers.get("slow").await.expect("slow");
        let conditions = b.status.map(|s| s.conditions).unwrap_or_default();
        assert!(
            conditions
                .iter()
                .any(|c| c.type_ == "KafkaReachable" && c.status == "False"),
            "the reconcile in flight at SIGTERM did not finish: {conditions:?}\n{}",
            op.log()
        );
        op.assert_no_forbidden();
        assert!(
            op.log().contains("DEBUG"),
            "the chart's logLevel did not reach the operator:\n{}",
            op.log()
        );
    });
}
