//! The CONNECT → CONNACK handshake: client identifier rules, authentication, keep-alive and
//! session expiry negotiation, session takeover or resumption.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::Packet;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use super::{ConnInfo, READ_CHUNK};
use crate::auth::{AuthDecision, Credentials};
use crate::broker::{Broker, OpenError};
use crate::metrics::ConnectResult;
use crate::protocol::{
    encode, ConnAck, ConnAckProperties, ConnectPacket, ConnectReturnCode, Decoder, Incoming,
    ProtocolVersion,
};
use crate::router::topic::validate_topic_name;
use crate::session::machine::{ClientLimits, Machine};
use crate::session::registry::Kick;
use crate::session::NEVER_EXPIRES;
use crate::storage::ClientKind;

/// A connection that passed CONNECT.
pub(super) struct Accepted {
    pub machine: Machine,
    pub conn_id: u64,
    pub kick_rx: oneshot::Receiver<Kick>,
    /// Keep-alive in force, seconds (0 = none).
    pub keep_alive: u16,
    pub session_present: bool,
    /// The encoded CONNACK, to be written first.
    pub connack: BytesMut,
}

/// Reads CONNECT and answers it. `Ok(None)` when the connection was refused (CONNACK with an
/// error code was sent where the spec asks for one) or closed.
pub(super) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Arc<Broker>,
    stream: &mut S,
    info: &ConnInfo,
    decoder: &mut Decoder,
    rbuf: &mut BytesMut,
) -> std::io::Result<Option<Accepted>> {
    let peer = info.peer;
    let connect = loop {
        match decoder.decode(rbuf) {
            Ok(Some(Incoming::Connect(connect))) => break connect,
            Ok(Some(_)) => {
                broker.metrics.connect_result(ConnectResult::ProtocolError);
                return Ok(None);
            }
            Ok(None) => {
                rbuf.reserve(READ_CHUNK);
                if stream.read_buf(rbuf).await? == 0 {
                    broker.metrics.connect_result(ConnectResult::NoConnect);
                    return Ok(None);
                }
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "bad CONNECT");
                broker.metrics.protocol_errors.inc();
                if let Some(code) = e.connack_code() {
                    let version = e
                        .connack_version()
                        .or(decoder.version())
                        .unwrap_or(ProtocolVersion::V3_1_1);
                    refuse(broker, stream, version, code).await;
                } else {
                    broker.metrics.connect_result(ConnectResult::ProtocolError);
                }
                return Ok(None);
            }
        }
    };
    let version = connect.version;
    let v5 = version == ProtocolVersion::V5;
    let limits = &broker.config.limits;

    // Over the connection rate: told so (v3 has no such code and gets 0x03, server unavailable).
    if info.over_rate {
        tracing::debug!(%peer, "connection rate exceeded");
        refuse(
            broker,
            stream,
            version,
            ConnectReturnCode::ConnectionRateExceeded,
        )
        .await;
        return Ok(None);
    }

    // v5 enhanced authentication is not offered [MQTT-3.1.2-? / 4.12]: refuse the method.
    if connect.properties.authentication_method.is_some() {
        refuse(
            broker,
            stream,
            version,
            ConnectReturnCode::BadAuthenticationMethod,
        )
        .await;
        return Ok(None);
    }
    let (client_id, assigned) = match client_identifier(&connect, limits.max_client_id_len) {
        Ok(id) => id,
        Err(code) => {
            refuse(broker, stream, version, code).await;
            return Ok(None);
        }
    };
    if let Some(will) = &connect.will {
        if validate_topic_name(&will.topic, &broker.topic_limits).is_err() {
            if v5 {
                refuse(broker, stream, version, ConnectReturnCode::TopicNameInvalid).await;
            } else {
                broker
                    .metrics
                    .connect_result(ConnectResult::TopicNameInvalid);
            }
            return Ok(None);
        }
    }
    // A fenced cluster node answers at once: authentication may need the storage it cannot
    // reach (the PostgreSQL credential store), and would only time out first.
    if broker.cluster().is_some_and(|c| c.is_fenced()) {
        refuse(
            broker,
            stream,
            version,
            ConnectReturnCode::ServerUnavailable,
        )
        .await;
        return Ok(None);
    }
    let decision = broker
        .auth
        .authenticate(&Credentials {
            client_id: &client_id,
            username: connect.username.as_deref(),
            password: connect.password.as_ref(),
            peer,
            listener: &info.listener,
            client_cert: info.client_cert.as_ref(),
        })
        .await;
    let identity = match decision {
        AuthDecision::Allow(identity) => identity,
        refused => {
            let code = match refused {
                AuthDecision::RateLimited => {
                    broker.metrics.auth_rate_limited.inc();
                    ConnectReturnCode::ConnectionRateExceeded
                }
                AuthDecision::Unavailable => ConnectReturnCode::ServerUnavailable,
                AuthDecision::NotAuthorized => {
                    broker.metrics.auth_failures.not_authorized.inc();
                    ConnectReturnCode::NotAuthorized
                }
                _ => {
                    broker.metrics.auth_failures.bad_credentials.inc();
                    ConnectReturnCode::BadUserNamePassword
                }
            };
            tracing::debug!(%peer, client_id = %client_id, ?code, "authentication refused");
            refuse(broker, stream, version, code).await;
            return Ok(None);
        }
    };
    let kind = identity
        .client_type
        .unwrap_or_else(|| broker.client_kind(&client_id));
    let acl = identity
        .acl
        .resolve(&client_id, identity.username.as_deref());
    // The will is published later on the client's behalf: its topic is authorized now.
    if let Some(will) = &connect.will {
        if !acl.may_publish(&will.topic) {
            broker.metrics.messages_dropped_acl.inc();
            refuse(broker, stream, version, ConnectReturnCode::NotAuthorized).await;
            return Ok(None);
        }
    }
    tracing::debug!(%peer, client_id = %client_id, via = identity.via, kind = kind.as_str(), "authenticated");

    let max_expiry = broker.config.session.max_session_expiry_secs;
    let requested_expiry = if v5 {
        connect.properties.session_expiry_interval.unwrap_or(0)
    } else if connect.clean_start {
        0
    } else {
        NEVER_EXPIRES
    };
    let expiry = if kind == ClientKind::Application {
        // APPLICATION sessions are always persistent, whatever the client asked for; v5
        // clients learn it from the Session Expiry Interval in CONNACK.
        NEVER_EXPIRES
    } else if v5 {
        requested_expiry.min(max_expiry)
    } else if requested_expiry == NEVER_EXPIRES {
        broker.config.session.v3_session_expiry_secs.min(max_expiry)
    } else {
        0
    };
    // A v3 client cannot be told another keep-alive, so its own value stands.
    let (keep_alive, server_keep_alive) = if v5 {
        negotiate_keep_alive(connect.keep_alive, limits.max_keep_alive_secs)
    } else {
        (connect.keep_alive, None)
    };

    let client_id: Arc<str> = Arc::from(client_id);
    let conn_id = broker.registry.next_id();
    let (kick_tx, kick_rx) = oneshot::channel();
    let (session, session_present) = match broker
        .open_session(
            client_id.clone(),
            conn_id,
            Some(kick_tx),
            connect.clean_start,
            expiry,
            kind,
        )
        .await
    {
        Ok(opened) => opened,
        Err(e) => {
            tracing::warn!(%peer, client_id = %client_id, error = %e, "refusing connection");
            let code = match e {
                OpenError::TakeoverTimeout => ConnectReturnCode::ServerBusy,
                // The APPLICATION client has no Kafka topic and the broker may not create one:
                // a provisioning problem, not an outage.
                OpenError::Storage(crate::storage::StorageError::MissingTopic(_)) => {
                    ConnectReturnCode::ImplementationSpecificError
                }
                OpenError::Storage(_) | OpenError::NodeFenced => {
                    ConnectReturnCode::ServerUnavailable
                }
            };
            refuse(broker, stream, version, code).await;
            return Ok(None);
        }
    };
    session.mailbox.set_online(true);

    let properties = v5.then(|| ConnAckProperties {
        session_expiry_interval: (expiry != requested_expiry).then_some(expiry),
        receive_max: Some(limits.max_inflight),
        max_qos: None,
        retain_available: None,
        max_packet_size: Some(limits.max_packet_size),
        assigned_client_identifier: assigned.then(|| client_id.to_string()),
        topic_alias_max: Some(limits.max_topic_alias),
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive,
        response_information: response_information(
            &broker.config.session.response_topic_prefix,
            connect.properties.request_response_info,
            &client_id,
        ),
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    });
    let mut connack = BytesMut::new();
    let _ = encode(
        &Packet::ConnAck(ConnAck {
            session_present,
            code: ConnectReturnCode::Success,
            properties,
        }),
        version,
        None,
        &mut connack,
    );

    let props = &connect.properties;
    let client = ClientLimits {
        receive_maximum: props.receive_maximum.unwrap_or(u16::MAX),
        max_packet_size: props.max_packet_size,
        topic_alias_maximum: props.topic_alias_max.unwrap_or(0),
        problem_information: props.request_problem_info.unwrap_or(1) == 1,
    };
    let ConnectPacket { will, .. } = *connect;
    let mut machine = Machine::new(broker.clone(), version, session, will, client);
    machine.set_acl(acl);
    Ok(Some(Accepted {
        machine,
        conn_id,
        kick_rx,
        keep_alive,
        session_present,
        connack,
    }))
}

/// The client identifier to use and whether the broker assigned it. Empty identifiers are
/// assigned for v5 [MQTT-3.1.3-6] and for 3.1.1 clean sessions [MQTT-3.1.3-7]; 3.1.1 with a
/// persistent session gets 0x02 [MQTT-3.1.3-8]; 3.1 requires one.
fn client_identifier(
    connect: &ConnectPacket,
    max_len: usize,
) -> Result<(String, bool), ConnectReturnCode> {
    let v5 = connect.version == ProtocolVersion::V5;
    let rejected = if v5 {
        ConnectReturnCode::ClientIdentifierNotValid
    } else {
        ConnectReturnCode::BadClientId
    };
    if connect.client_id.is_empty() {
        let allowed = match connect.version {
            ProtocolVersion::V5 => true,
            ProtocolVersion::V3_1_1 => connect.clean_start,
            ProtocolVersion::V3_1 => false,
        };
        if !allowed {
            return Err(rejected);
        }
        return Ok((assign_client_id(), true));
    }
    if connect.client_id.len() > max_len {
        return Err(rejected);
    }
    Ok((connect.client_id.clone(), false))
}

/// A client id unique within this process and unlikely to collide across restarts.
fn assign_client_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("ferrymq-{nanos:x}-{n:x}")
}

/// Response Information for a v5 client that asked for it (v5 §3.1.2.11.6, §4.10).
fn response_information(prefix: &str, requested: Option<u8>, client_id: &str) -> Option<String> {
    (requested == Some(1) && !prefix.is_empty()).then(|| format!("{prefix}/{client_id}"))
}

/// The keep-alive in force and, for v5, the Server Keep Alive to announce when it differs.
fn negotiate_keep_alive(requested: u16, max: u16) -> (u16, Option<u16>) {
    if max == 0 || (requested != 0 && requested <= max) {
        return (requested, None);
    }
    (max, Some(max))
}

/// Sends CONNACK with a refusal code and closes [MQTT-3.2.2-5]. Counted by its code.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Broker,
    stream: &mut S,
    version: ProtocolVersion,
    code: ConnectReturnCode,
) {
    broker.metrics.connect_result(refusal_result(code));
    let mut out = BytesMut::new();
    if encode(
        &Packet::ConnAck(ConnAck {
            session_present: false,
            code,
            properties: None,
        }),
        version,
        None,
        &mut out,
    )
    .is_ok()
    {
        let _ = stream.write_all(&out).await;
        let _ = stream.flush().await;
    }
    let _ = stream.shutdown().await;
    // A client that pipelined packets behind its CONNECT must still read the refusal.
    super::linger(stream).await;
}

/// The `ferrymq_connects_total` result a CONNACK refusal code stands for.
fn refusal_result(code: ConnectReturnCode) -> ConnectResult {
    use ConnectReturnCode as C;
    match code {
        C::RefusedProtocolVersion | C::UnsupportedProtocolVersion => {
            ConnectResult::UnsupportedProtocolVersion
        }
        C::BadClientId | C::ClientIdentifierNotValid => ConnectResult::ClientIdRejected,
        C::BadUserNamePassword => ConnectResult::BadCredentials,
        C::NotAuthorized => ConnectResult::NotAuthorized,
        C::BadAuthenticationMethod => ConnectResult::BadAuthenticationMethod,
        C::MalformedPacket | C::ProtocolError | C::PacketTooLarge => ConnectResult::ProtocolError,
        C::TopicNameInvalid => ConnectResult::TopicNameInvalid,
        C::ServerBusy => ConnectResult::ServerBusy,
        C::ServiceUnavailable | C::ServerUnavailable => ConnectResult::ServerUnavailable,
        C::QuotaExceeded => ConnectResult::QuotaExceeded,
        C::ConnectionRateExceeded => ConnectResult::ConnectionRateExceeded,
        C::Banned => ConnectResult::Banned,
        _ => ConnectResult::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_information_only_when_requested() {
        assert_eq!(
            response_information("responses", Some(1), "c1").as_deref(),
            Some("responses/c1")
        );
        assert_eq!(response_information("responses", Some(0), "c1"), None);
        assert_eq!(response_information("responses", None, "c1"), None);
        assert_eq!(response_information("", Some(1), "c1"), None);
    }

    #[test]
    fn keep_alive_negotiation() {
        assert_eq!(negotiate_keep_alive(30, 0), (30, None));
        assert_eq!(negotiate_keep_alive(0, 0), (0, None));
        assert_eq!(negotiate_keep_alive(30, 60), (30, None));
        assert_eq!(negotiate_keep_alive(120, 60), (60, Some(60)));
        assert_eq!(negotiate_keep_alive(0, 60), (60, Some(60)));
    }
}
