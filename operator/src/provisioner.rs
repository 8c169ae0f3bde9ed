//! The production [`Provisioner`]: `crate::provision` against real Kafka and PostgreSQL, with
//! admin clients and connection pools cached per cluster so a resync does not reconnect.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::PgPool;
use tokio::sync::Mutex;

use crate::provision::{kafka, postgres};
use crate::seam::{
    AppCredential, BrokerDatabase, KafkaTarget, ProvisionError, Provisioner, TopicState,
    TopicWanted,
};

/// Clients kept at most; beyond it the caches start over (a rotated Kafka property or password
/// makes a new key, and the old client must not live forever).
const MAX_CACHED: usize = 64;

#[derive(Default)]
pub struct Real {
    kafka: Mutex<HashMap<String, Arc<kafka::KafkaAdmin>>>,
    pools: Mutex<HashMap<String, PgPool>>,
}

fn kafka_error(e: kafka::KafkaError) -> ProvisionError {
    ProvisionError {
        transient: e.is_transient(),
        message: e.to_string(),
    }
}

fn pg_error(e: postgres::PostgresError) -> ProvisionError {
    ProvisionError {
        transient: e.is_transient(),
        message: e.to_string(),
    }
}

impl Real {
    pub fn new() -> Real {
        Real::default()
    }

    async fn admin(&self, target: &KafkaTarget) -> Result<Arc<kafka::KafkaAdmin>, ProvisionError> {
        let key = format!("{}\n{:?}", target.bootstrap_servers, target.properties);
        let mut cache = self.kafka.lock().await;
        if let Some(admin) = cache.get(&key) {
            return Ok(admin.clone());
        }
        let mut connection = kafka::KafkaConnection::new(target.bootstrap_servers.clone());
        connection.properties = target.properties.clone();
        let admin = Arc::new(kafka::KafkaAdmin::new(connection).map_err(kafka_error)?);
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(key, admin.clone());
        Ok(admin)
    }

    /// A pool on `url`, with `search_path` set to `schema` when given.
    ///
    /// The credential statements name `mqtt_credentials` unqualified, as the broker's do: they
    /// resolve in the broker's schema through `search_path`, which the broker sets from
    /// `postgres.schema` on each connection. The URL alone does not: the one the operator
    /// writes for a provisioned database carries only the role and password, and the role's
    /// default search_path (`"$user", public`) misses the schema (the role is
    /// `<schema>_broker`); a `urlSecretRef` URL need not name the schema either.
    async fn pool(&self, url: &str, schema: Option<&str>) -> Result<PgPool, ProvisionError> {
        let key = format!("{url}\n{}", schema.unwrap_or_default());
        let mut cache = self.pools.lock().await;
        if let Some(pool) = cache.get(&key) {
            return Ok(pool.clone());
        }
        let mut options = postgres::parse_url(url).map_err(pg_error)?;
        if let Some(schema) = schema {
            // A startup option: only a plain identifier may go there unquoted (the CRD and the
            // broker enforce the same rule).
            postgres::validate_identifier("schema", schema).map_err(pg_error)?;
            options = options.options([("search_path", schema)]);
        }
        let pool = postgres::broker_pool(&options).await.map_err(pg_error)?;
        if cache.len() >= MAX_CACHED {
            for (_, old) in cache.drain() {
                old.close().await;
            }
        }
        cache.insert(key, pool.clone());
        Ok(pool)
    }
}

#[async_trait]
impl Provisioner for Real {
    async fn check_kafka(&self, target: &KafkaTarget) -> Result<(), ProvisionError> {
        self.admin(target).await?.check().await.map_err(kafka_error)
    }

    async fn ensure_topic(
        &self,
        target: &KafkaTarget,
        topic: &TopicWanted,
    ) -> Result<TopicState, ProvisionError> {
        let spec = kafka::TopicSpec {
            name: topic.name.clone(),
            partitions: topic.partitions,
            replication_factor: topic.replication_factor,
            config: topic.config.clone(),
        };
        let outcome = self
            .admin(target)
            .await?
            .ensure_topic(&spec)
            .await
            .map_err(kafka_error)?;
        Ok(TopicState {
            topic_id: outcome.topic.topic_id.clone(),
            partitions: outcome.topic.partitions,
            created: outcome.action == kafka::TopicAction::Created,
            grown_from: outcome.grown_from,
            reverted: outcome
                .config_changes
                .iter()
                .map(ToString::to_string)
                .collect(),
            // -1 asks for the cluster default, which an existing topic cannot be compared with.
            replication_factor_differs: outcome
                .replication_factor_differs
                .filter(|(_, wanted)| *wanted != -1),
        })
    }

    async fn delete_topic(
        &self,
        target: &KafkaTarget,
        topic: &str,
    ) -> Result<bool, ProvisionError> {
        self.admin(target)
            .await?
            .delete_topic(topic)
            .await
            .map_err(kafka_error)
    }

    async fn ensure_broker_database(
        &self,
        admin_url: &str,
        db: &BrokerDatabase,
        password: &str,
    ) -> Result<bool, ProvisionError> {
        let db = postgres::BrokerDatabase {
            schema: db.schema.clone(),
            role: db.role.clone(),
        };
        postgres::ensure_broker_database(admin_url, &db, password)
            .await
            .map(|o| o.changed())
            .map_err(pg_error)
    }

    async fn check_postgres(&self, url: &str) -> Result<(), ProvisionError> {
        let pool = self.pool(url, None).await?;
        sqlx::query("SELECT 1")
            .execute(&pool)
            .await
            .map(|_| ())
            .map_err(|e| ProvisionError::transient(format!("postgres: {e}")))
    }

    async fn upsert_application(
        &self,
        broker_url: &str,
        schema: &str,
        c: &AppCredential,
    ) -> Result<bool, ProvisionError> {
        let pool = self.pool(broker_url, Some(schema)).await?;
        let credential = postgres::ApplicationCredential {
            client_id: c.client_id.clone(),
            username: c.username.clone(),
            password: c.password.clone(),
            publish: c.publish.clone(),
            subscribe: c.subscribe.clone(),
        };
        postgres::upsert_application(&pool, schema, &credential)
            .await
            .map(|change| change != postgres::Change::Unchanged)
            .map_err(pg_error)
    }

    async fn delete_application(
        &self,
        broker_url: &str,
        schema: &str,
        client_id: &str,
        username: &str,
    ) -> Result<bool, ProvisionError> {
        let pool = self.pool(broker_url, Some(schema)).await?;
        postgres::delete_application(&pool, schema, client_id, username)
            .await
            .map_err(pg_error)
    }
}
