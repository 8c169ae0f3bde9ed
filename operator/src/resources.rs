//! The Kubernetes objects an `MqttBroker` owns, built from its spec: ConfigMap, StatefulSet,
//! headless and client Services, PodDisruptionBudget, ServiceMonitor. Pure functions, so the
//! controller's only job is to apply them.

use std::collections::BTreeMap;

use ferrymq_crds::{Endpoint, Listener, ListenerService, MqttBroker, ServiceType};
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction, Lifecycle, LifecycleHandler,
    ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, SecretEnvSource, SecretKeySelector, SecretVolumeSource,
    SecurityContext, Service, ServicePort, ServiceSpec, SleepAction, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::config::{CONFIG_DIR, CONFIG_FILE, DATA_DIR, TLS_DIR};

/// Pod template annotation carrying the hash of the rendered config: a config change changes
/// the template, so the StatefulSet rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "ferrymq.io/config-hash";
/// Pod template annotation carrying the hash of the Secrets the broker reads as environment
/// variables (they are read once at start, so a change must restart the pods).
pub const SECRET_HASH_ANNOTATION: &str = "ferrymq.io/secret-hash";
/// Label every owned object carries, naming the MqttBroker.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// The field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "ferrymq-operator";
/// Label telling the client Service(s) from the headless one.
pub const SERVICE_ROLE_LABEL: &str = "ferrymq.io/service";
/// The environment variable that gives a Kafka + PostgreSQL pod its cluster node id (its name).
pub const NODE_ID_ENV: &str = "FERRYMQ_CLUSTER__NODE_ID";
/// Key of the PostgreSQL URL in the Secret the operator writes for a provisioned role.
pub const POSTGRES_URL_KEY: &str = "url";

const HTTP_PORT_NAME: &str = "http";
const CONFIG_VOLUME: &str = "config";
const DATA_VOLUME: &str = "data";
/// The uid/gid the broker runs as when the spec sets no security context.
const DEFAULT_UID: i64 = 65532;

/// Selector labels of the broker's pods.
pub fn selector_labels(broker: &MqttBroker) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "ferrymq".to_string()),
        (INSTANCE_LABEL.to_string(), broker.name_any()),
    ])
}

/// Labels of every owned object.
pub fn labels(broker: &MqttBroker) -> BTreeMap<String, String> {
    let mut l = selector_labels(broker);
    l.insert("app.kubernetes.io/component".into(), "broker".into());
    l.insert(
        "app.kubernetes.io/managed-by".into(),
        "ferrymq-operator".into(),
    );
    l
}

/// The label selector string the scale subresource reports.
pub fn selector_string(broker: &MqttBroker) -> String {
    selector_labels(broker)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn config_map_name(broker: &MqttBroker) -> String {
    format!("{}-config", broker.name_any())
}

pub fn headless_service_name(broker: &MqttBroker) -> String {
    format!("{}-headless", broker.name_any())
}

/// Secret the operator writes the provisioned PostgreSQL role's URL into.
pub fn postgres_secret_name(broker: &MqttBroker) -> String {
    format!("{}-postgres", broker.name_any())
}

/// The Secret key the broker reads its PostgreSQL URL from: the user's `urlSecretRef`, or the
/// Secret the operator writes when it provisions the role.
pub fn postgres_url_ref(broker: &MqttBroker) -> Option<(String, String)> {
    let pg = &broker.spec.storage.kafka_postgres.as_ref()?.postgres;
    Some(match &pg.url_secret_ref {
        Some(r) => (r.name.clone(), r.key.clone()),
        None => (postgres_secret_name(broker), POSTGRES_URL_KEY.into()),
    })
}

fn meta(broker: &MqttBroker, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: broker.namespace(),
        labels: Some(labels(broker)),
        owner_references: broker.controller_owner_ref(&()).map(|r| vec![r]),
        ..ObjectMeta::default()
    }
}

/// Hex SHA-256 of `data`, shortened: it only has to change when the data does.
pub fn short_hash(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn config_map(broker: &MqttBroker, rendered: &str) -> ConfigMap {
    ConfigMap {
        metadata: meta(broker, config_map_name(broker)),
        data: Some(BTreeMap::from([(
            CONFIG_FILE.to_string(),
            rendered.to_string(),
        )])),
        ..ConfigMap::default()
    }
}

fn service_port(l: &Listener) -> ServicePort {
    ServicePort {
        name: Some(l.name.clone()),
        port: l.port,
        target_port: Some(IntOrString::String(l.name.clone())),
        protocol: Some("TCP".into()),
        app_protocol: Some(l.protocol.as_str().into()),
        ..ServicePort::default()
    }
}

/// The headless Service: stable pod DNS names for the StatefulSet, and the metrics port the
/// ServiceMonitor scrapes.
pub fn headless_service(broker: &MqttBroker) -> Service {
    let mut ports: Vec<ServicePort> = broker.spec.listeners.iter().map(service_port).collect();
    ports.push(ServicePort {
        name: Some(HTTP_PORT_NAME.into()),
        port: broker.spec.metrics.port,
        target_port: Some(IntOrString::String(HTTP_PORT_NAME.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    });
    let mut metadata = meta(broker, headless_service_name(broker));
    metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(SERVICE_ROLE_LABEL.into(), "headless".into());
    Service {
        metadata,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            // Pods are addressable before they are ready, so brokers can find each other
            // while starting.
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(broker)),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Name of the client Service that exposes `listener`: listeners with default Service settings
/// share `<broker>`; a listener with its own type or annotations gets `<broker>-<listener>`.
pub fn client_service_name(broker: &MqttBroker, listener: &Listener) -> String {
    if listener.service == ListenerService::default() {
        broker.name_any()
    } else {
        format!("{}-{}", broker.name_any(), listener.name)
    }
}

/// The client Services, one per distinct name (see [`client_service_name`]).
pub fn client_services(broker: &MqttBroker) -> Vec<Service> {
    let mut by_name: BTreeMap<String, (ListenerService, Vec<ServicePort>)> = BTreeMap::new();
    for l in &broker.spec.listeners {
        by_name
            .entry(client_service_name(broker, l))
            .or_insert_with(|| (l.service.clone(), Vec::new()))
            .1
            .push(service_port(l));
    }
    by_name
        .into_iter()
        .map(|(name, (settings, ports))| {
            let mut metadata = meta(broker, name);
            metadata
                .labels
                .get_or_insert_with(BTreeMap::new)
                .insert(SERVICE_ROLE_LABEL.into(), "client".into());
            if !settings.annotations.is_empty() {
                metadata.annotations = Some(settings.annotations.clone());
            }
            Service {
                metadata,
                spec: Some(ServiceSpec {
                    type_: Some(settings.type_.as_str().into()),
                    load_balancer_class: match settings.type_ {
                        ServiceType::LoadBalancer => settings.load_balancer_class.clone(),
                        _ => None,
                    },
                    selector: Some(selector_labels(broker)),
                    ports: Some(ports),
                    ..ServiceSpec::default()
                }),
                ..Service::default()
            }
        })
        .collect()
}

/// Where clients connect, one entry per listener (the in-cluster DNS name of its Service).
pub fn endpoints(broker: &MqttBroker) -> Vec<Endpoint> {
    let ns = broker.namespace().unwrap_or_else(|| "default".into());
    broker
        .spec
        .listeners
        .iter()
        .map(|l| {
            let host = format!("{}.{ns}.svc", client_service_name(broker, l));
            Endpoint {
                listener: l.name.clone(),
                url: format!("{}://{host}:{}", l.protocol.as_str(), l.port),
                host,
                port: l.port,
            }
        })
        .collect()
}

/// The broker StatefulSet. `config_hash` and `secret_hash` go into the pod template so a change
/// of either rolls the pods.
pub fn stateful_set(broker: &MqttBroker, config_hash: &str, secret_hash: &str) -> StatefulSet {
    let spec = &broker.spec;
    let mut ports: Vec<ContainerPort> = spec
        .listeners
        .iter()
        .map(|l| ContainerPort {
            name: Some(l.name.clone()),
            container_port: l.port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        })
        .collect();
    ports.push(ContainerPort {
        name: Some(HTTP_PORT_NAME.into()),
        container_port: spec.metrics.port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    });

    let mut env = Vec::new();
    let mut env_from = Vec::new();
    if spec.storage.kafka_postgres.is_some() {
        // Each pod is a cluster node named after itself: the StatefulSet keeps the name
        // across restarts, and it is unique within the broker (docs/scale-out.md).
        env.push(EnvVar {
            name: NODE_ID_ENV.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        });
    }
    if let Some((name, key)) = postgres_url_ref(broker) {
        env.push(EnvVar {
            name: "FERRYMQ_POSTGRES__URL".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name,
                    key,
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        });
    }
    if let Some(props) = spec
        .storage
        .kafka_postgres
        .as_ref()
        .and_then(|kp| kp.kafka.properties_secret_ref.as_ref())
    {
        // Each key of the Secret becomes FERRYMQ_KAFKA__PROPERTIES__<key>; the broker lowercases
        // the path, and keeps property values as text.
        env_from.push(EnvFromSource {
            prefix: Some("FERRYMQ_KAFKA__PROPERTIES__".into()),
            secret_ref: Some(SecretEnvSource {
                name: props.name.clone(),
                optional: Some(false),
            }),
            ..EnvFromSource::default()
        });
    }

    let mut volumes = vec![Volume {
        name: CONFIG_VOLUME.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map_name(broker),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    let mut mounts = vec![
        VolumeMount {
            name: CONFIG_VOLUME.into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: DATA_VOLUME.into(),
            mount_path: DATA_DIR.into(),
            ..VolumeMount::default()
        },
    ];
    for l in spec.listeners.iter().filter(|l| l.protocol.is_tls()) {
        if let Some(tls) = &l.tls_secret_ref {
            let volume = format!("tls-{}", l.name);
            volumes.push(Volume {
                name: volume.clone(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(tls.name.clone()),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            });
            mounts.push(VolumeMount {
                name: volume,
                mount_path: format!("{TLS_DIR}/{}", l.name),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        }
    }

    let claim_templates = match &spec.storage.embedded {
        Some(embedded) => Some(vec![PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(DATA_VOLUME.into()),
                labels: Some(selector_labels(broker)),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: embedded.storage_class_name.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_string(),
                        embedded.size.clone(),
                    )])),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        }]),
        None => {
            // Kafka + PostgreSQL keeps nothing durable on disk; the directory only has to be
            // writable.
            volumes.push(Volume {
                name: DATA_VOLUME.into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            });
            None
        }
    };

    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(HTTP_PORT_NAME.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(5),
        ..Probe::default()
    };

    // What `config::render` refused is never applied; the fallback only keeps this total.
    let stopping = crate::config::stopping(spec).unwrap_or(crate::config::Stopping {
        pre_stop_secs: 0,
        drain_secs: 0,
        grace_secs: crate::config::DEFAULT_GRACE_SECS,
    });
    // A pause before SIGTERM while the pod leaves the Service's endpoints, so that the
    // clients the broker then drains do not reconnect to it (the sleep action needs no
    // shell or binary in the image).
    let lifecycle = (stopping.pre_stop_secs > 0).then(|| Lifecycle {
        pre_stop: Some(LifecycleHandler {
            sleep: Some(SleepAction {
                seconds: stopping.pre_stop_secs,
            }),
            ..LifecycleHandler::default()
        }),
        ..Lifecycle::default()
    });

    let container = Container {
        name: "ferrymq".into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_string()),
        args: Some(vec![
            "--config".into(),
            format!("{CONFIG_DIR}/{CONFIG_FILE}"),
        ]),
        ports: Some(ports),
        env: (!env.is_empty()).then_some(env),
        env_from: (!env_from.is_empty()).then_some(env_from),
        resources: spec.resources.clone(),
        volume_mounts: Some(mounts),
        // Startup covers connecting to Kafka/PostgreSQL and opening storage (up to 5 minutes);
        // liveness then only catches a wedged process, readiness a broker whose storage is down.
        startup_probe: Some(probe("/health/live", 5, 60)),
        liveness_probe: Some(probe("/health/live", 10, 3)),
        readiness_probe: Some(probe("/health/ready", 5, 2)),
        lifecycle,
        security_context: Some(spec.pod.container_security_context.clone().unwrap_or(
            SecurityContext {
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                run_as_non_root: Some(true),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Capabilities::default()
                }),
                ..SecurityContext::default()
            },
        )),
        ..Container::default()
    };

    let mut pod_labels = spec.pod.labels.clone();
    pod_labels.extend(selector_labels(broker));
    let mut pod_annotations = spec.pod.annotations.clone();
    pod_annotations.insert(CONFIG_HASH_ANNOTATION.into(), config_hash.into());
    pod_annotations.insert(SECRET_HASH_ANNOTATION.into(), secret_hash.into());

    StatefulSet {
        metadata: meta(broker, broker.name_any()),
        spec: Some(StatefulSetSpec {
            replicas: Some(spec.replicas),
            service_name: Some(headless_service_name(broker)),
            // Broker pods do not depend on each other's order; starting them together halves
            // a rollout of a large cluster.
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector_labels(broker)),
                ..LabelSelector::default()
            },
            // Every pod is an active node that turns ready, so the StatefulSet controller's own
            // rolling update (one pod at a time, highest ordinal first, each waiting for its
            // successor to be ready) is the rollout; the PodDisruptionBudget bounds voluntary
            // evictions the same way.
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                ..StatefulSetUpdateStrategy::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(volumes),
                    node_selector: non_empty(spec.pod.node_selector.clone()),
                    tolerations: (!spec.pod.tolerations.is_empty())
                        .then(|| spec.pod.tolerations.clone()),
                    affinity: spec.pod.affinity.clone(),
                    topology_spread_constraints: (!spec.pod.topology_spread_constraints.is_empty())
                        .then(|| spec.pod.topology_spread_constraints.clone()),
                    priority_class_name: spec.pod.priority_class_name.clone(),
                    service_account_name: spec.pod.service_account_name.clone(),
                    image_pull_secrets: (!spec.image_pull_secrets.is_empty())
                        .then(|| spec.image_pull_secrets.clone()),
                    termination_grace_period_seconds: Some(stopping.grace_secs),
                    security_context: Some(spec.pod.security_context.clone().unwrap_or(
                        PodSecurityContext {
                            run_as_non_root: Some(true),
                            run_as_user: Some(DEFAULT_UID),
                            run_as_group: Some(DEFAULT_UID),
                            fs_group: Some(DEFAULT_UID),
                            ..PodSecurityContext::default()
                        },
                    )),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: claim_templates,
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

fn non_empty(m: BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!m.is_empty()).then_some(m)
}

/// The PodDisruptionBudget, or `None` when the spec turns it off.
pub fn pod_disruption_budget(broker: &MqttBroker) -> Option<PodDisruptionBudget> {
    let budget = &broker.spec.disruption_budget;
    if !budget.enabled {
        return None;
    }
    let (min_available, max_unavailable) = match (&budget.min_available, &budget.max_unavailable) {
        (None, None) => (None, Some(IntOrString::Int(1))),
        (min, max) => (min.clone(), max.clone()),
    };
    Some(PodDisruptionBudget {
        metadata: meta(broker, broker.name_any()),
        spec: Some(PodDisruptionBudgetSpec {
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(broker)),
                ..LabelSelector::default()
            }),
            min_available,
            max_unavailable,
            // An unready node serves no clients (it is out of the Service), so evicting it
            // must not wait for the budget: a node stuck unready would otherwise block every
            // node drain of the cluster.
            unhealthy_pod_eviction_policy: broker
                .spec
                .storage
                .kafka_postgres
                .is_some()
                .then(|| "AlwaysAllow".into()),
        }),
        ..PodDisruptionBudget::default()
    })
}

/// The Prometheus Operator's ServiceMonitor resource.
pub fn service_monitor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

/// A ServiceMonitor scraping `/metrics` on the headless Service's `http` port.
pub fn service_monitor(broker: &MqttBroker) -> DynamicObject {
    let sm = &broker.spec.metrics.service_monitor;
    let mut metadata = meta(broker, broker.name_any());
    metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .extend(sm.labels.clone());
    let mut endpoint = serde_json::json!({"port": HTTP_PORT_NAME, "path": "/metrics"});
    if let Some(interval) = &sm.interval {
        endpoint["interval"] = interval.clone().into();
    }
    let mut selector = selector_labels(broker);
    selector.insert(SERVICE_ROLE_LABEL.into(), "headless".into());
    DynamicObject::new(&broker.name_any(), &service_monitor_resource())
        .within(&broker.namespace().unwrap_or_default())
        .data(serde_json::json!({
            "spec": {
                "selector": {"matchLabels": selector},
                "endpoints": [endpoint],
            }
        }))
        .with_meta(metadata)
}

trait WithMeta {
    fn with_meta(self, meta: ObjectMeta) -> Self;
}

impl WithMeta for DynamicObject {
    fn with_meta(mut self, meta: ObjectMeta) -> Self {
        self.metadata = meta;
        self
    }
}
