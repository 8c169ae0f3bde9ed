//! Authentication and authorization over real TCP connections: store credentials (argon2id and
//! imported bcrypt), JWTs signed here, the failure rate limit, client type from credentials, and
//! ACL denials on PUBLISH, SUBSCRIBE, the will and retained delivery.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{connect5_packet, filter5, publish5_packet, start_with, Raw, QUIET};
use ferrymq::auth::acl::AclRules;
use ferrymq::auth::password;
use ferrymq::auth::store::{ClientType, CredentialRecord, CredentialStore};
use ferrymq::config::{AuthProviderKind, Config, JwtConfig, V3DeniedPublish};
use ferrymq::server::Server;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5::{
    self, ConnectReturnCode, Packet, PubAckReason, PubRecReason, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;

const HS_SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";
const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "ferrymq-test";

/// A broker with `providers` and anonymous access off, and a handle on its credential store.
async fn start_auth(
    providers: &[AuthProviderKind],
    tweak: impl FnOnce(&mut Config),
) -> (Server, SocketAddr, Arc<dyn CredentialStore>) {
    let providers = providers.to_vec();
    let (server, addr) = start_with(|c| {
        c.auth.allow_anonymous = false;
        c.auth.providers = providers;
        tweak(c);
    })
    .await;
    let store = server
        .broker
        .auth
        .credential_store()
        .expect("the configured authenticator has a store");
    (server, addr, store)
}

fn rules(publish: &[&str], subscribe: &[&str]) -> AclRules {
    AclRules {
        publish: publish.iter().map(|s| s.to_string()).collect(),
        subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
    }
}

fn user(name: &str, password: &str, acl: AclRules) -> CredentialRecord {
    CredentialRecord {
        username: Some(name.into()),
        client_id: None,
        password_hash: Some(password::hash(password.as_bytes()).unwrap()),
        client_type: None,
        acl,
    }
}

async fn connect5_login(
    addr: SocketAddr,
    id: &str,
    login: Option<(&str, &str)>,
    will: Option<v5::LastWill>,
) -> (Raw, v5::ConnAck) {
    let mut c = Raw::connect(addr).await;
    let login = login.map(|(u, p)| v5::Login::new(u, p));
    c.send5(Packet::Connect(connect5_packet(id, true, 0), will, login))
        .await;
    match c.recv5().await {
        Packet::ConnAck(ack) => (c, ack),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

async fn connack5(addr: SocketAddr, id: &str, login: Option<(&str, &str)>) -> ConnectReturnCode {
    connect5_login(addr, id, login, None).await.1.code
}

async fn connect4_login(
    addr: SocketAddr,
    id: &str,
    login: Option<(&str, &str)>,
    will: Option<v4::LastWill>,
) -> (Raw, v4::ConnAck) {
    let mut c = Raw::connect(addr).await;
    let mut connect = v4::Connect::new(id);
    connect.keep_alive = 30;
    if let Some((u, p)) = login {
        connect.set_login(u, p);
    }
    connect.last_will = will;
    c.send4(v4::Packet::Connect(connect)).await;
    match c.recv4().await {
        v4::Packet::ConnAck(ack) => (c, ack),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// --- store credentials ---------------------------------------------------------------------

#[tokio::test]
async fn store_passwords_right_wrong_unknown_and_missing() {
    let (_server, addr, store) = start_auth(&[AuthProviderKind::Store], |_| {}).await;
    store
        .put(user("alice", "s3cret", AclRules::everything()))
        .await
        .unwrap();
    assert_eq!(
        connack5(addr, "a1", Some(("alice", "s3cret"))).await,
        ConnectReturnCode::Success
    );
    assert_eq!(
        connack5(addr, "a2", Some(("alice", "wrong"))).await,
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        connack5(addr, "a3", Some(("mallory", "s3cret"))).await,
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        connack5(addr, "a4", None).await,
        ConnectReturnCode::NotAuthorized
    );
    // The same over MQTT 3.1.1: 0x04 and 0x05.
    let (_c, ack) = connect4_login(addr, "b1", Some(("alice", "s3cret")), None).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::Success);
    let (mut c, ack) = connect4_login(addr, "b2", Some(("alice", "nope")), None).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::BadUserNamePassword);
    assert!(c.closed_within(common::WAIT).await.is_some());
    let (_c, ack) = connect4_login(addr, "b3", None, None).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::NotAuthorized);
}

#[tokio::test]
async fn bcrypt_imported_hash_logs_in() {
    let (_server, addr, store) = start_auth(&[AuthProviderKind::Store], |_| {}).await;
    let mut record = user("legacy", "unused", AclRules::everything());
    record.password_hash = Some(bcrypt::hash("from-mosquitto", 4).unwrap());
    store.put(record).await.unwrap();
    assert_eq!(
        connack5(addr, "l1", Some(("legacy", "from-mosquitto"))).await,
        ConnectReturnCode::Success
    );
    assert_eq!(
        connack5(addr, "l2", Some(("legacy", "from-mosquitt"))).await,
        ConnectReturnCode::BadUserNamePassword
    );
}

#[tokio::test]
async fn user_bound_to_a_client_id_cannot_use_another() {
    let (_server, addr, store) = start_auth(&[AuthProviderKind::Store], |_| {}).await;
    let mut record = user("meter", "pw", AclRules::everything());
    record.client_id = Some("meter-17".into());
    store.put(record).await.unwrap();
    assert_eq!(
        connack5(addr, "meter-17", Some(("meter", "pw"))).await,
        ConnectReturnCode::Success
    );
    assert_eq!(
        connack5(addr, "meter-18", Some(("meter", "pw"))).await,
        ConnectReturnCode::NotAuthorized
    );
}

#[tokio::test]
async fn failed_attempts_are_rate_limited_per_address() {
    let (server, addr, store) = start_auth(&[AuthProviderKind::Store], |c| {
        c.auth.failure_burst = 2;
        c.auth.failure_refill_secs = 3600;
    })
    .await;
    store
        .put(user("bob", "right", AclRules::everything()))
        .await
        .unwrap();
    for id in ["g1", "g2"] {
        assert_eq!(
            connack5(addr, id, Some(("bob", "guess"))).await,
            ConnectReturnCode::BadUserNamePassword
        );
    }
    // Blocked now, even with the right password.
    assert_eq!(
        connack5(addr, "g3", Some(("bob", "right"))).await,
        ConnectReturnCode::ConnectionRateExceeded
    );
    let metrics = &server.broker.metrics;
    assert_eq!(metrics.auth_failures.get(), 2);
    assert_eq!(metrics.auth_rate_limited.get(), 1);
}

#[tokio::test]
async fn credential_type_decides_application_and_registration_works() {
    let (_server, addr, store) = start_auth(&[AuthProviderKind::Store], |c| {
        c.auth.allow_anonymous = true;
    })
    .await;
    let mut app = user("analytics", "pw", AclRules::everything());
    app.client_type = Some(ClientType::Application);
    store.put(app).await.unwrap();
    // APPLICATION sessions are persistent whatever the client asks: CONNACK says so.
    let (_c, ack) = connect5_login(addr, "an-1", Some(("analytics", "pw")), None).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let expiry = ack.properties.and_then(|p| p.session_expiry_interval);
    assert_eq!(expiry, Some(u32::MAX));
    // A client-id registration (no password) gives the type to an anonymous client.
    store
        .put(CredentialRecord {
            username: None,
            client_id: Some("registered-app".into()),
            password_hash: None,
            client_type: Some(ClientType::Application),
            acl: AclRules::default(),
        })
        .await
        .unwrap();
    let (_c, ack) = connect5_login(addr, "registered-app", None, None).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert_eq!(
        ack.properties.and_then(|p| p.session_expiry_interval),
        Some(u32::MAX)
    );
    // Everyone else is a DEVICE with what it asked for.
    let (_c, ack) = connect5_login(addr, "plain", None, None).await;
    assert_eq!(ack.properties.and_then(|p| p.session_expiry_interval), None);
}

// --- JWT -----------------------------------------------------------------------------------

fn jwt_config(algorithm: &str, key_file: Option<&str>) -> JwtConfig {
    JwtConfig {
        algorithm: algorithm.into(),
        secret: (algorithm == "HS256").then(|| HS_SECRET.to_string()),
        public_key_file: key_file
            .map(|f| format!("{}/tests/fixtures/{f}", env!("CARGO_MANIFEST_DIR")).into()),
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        leeway_secs: 5,
    }
}

async fn start_jwt(jwt: JwtConfig) -> (Server, SocketAddr) {
    let (server, addr, _) = start_auth(&[AuthProviderKind::Jwt, AuthProviderKind::Store], |c| {
        c.auth.jwt = Some(jwt);
        c.auth.failure_burst = 0;
    })
    .await;
    (server, addr)
}

fn claims(extra: serde_json::Value) -> serde_json::Value {
    let mut base = serde_json::json!({
        "sub": "sensor-7",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": now() + 600,
    });
    if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    base
}

fn hs256(claims: &serde_json::Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[tokio::test]
async fn jwt_hs256_refusals() {
    let (_server, addr) = start_jwt(jwt_config("HS256", None)).await;
    let cases = [
        (
            "expired",
            hs256(&claims(serde_json::json!({"exp": now() - 120})), HS_SECRET),
        ),
        (
            "forged",
            hs256(
                &claims(serde_json::json!({})),
                "another-secret-of-enough-length-000",
            ),
        ),
        (
            "wrong issuer",
            hs256(
                &claims(serde_json::json!({"iss": "https://evil.test"})),
                HS_SECRET,
            ),
        ),
        (
            "wrong audience",
            hs256(
                &claims(serde_json::json!({"aud": "someone-else"})),
                HS_SECRET,
            ),
        ),
        (
            "no expiry",
            hs256(
                &serde_json::json!({"sub": "x", "iss": ISSUER, "aud": AUDIENCE}),
                HS_SECRET,
            ),
        ),
        (
            "not yet valid",
            hs256(&claims(serde_json::json!({"nbf": now() + 600})), HS_SECRET),
        ),
        (
            "bad client type",
            hs256(
                &claims(serde_json::json!({"mqtt_client_type": "admin"})),
                HS_SECRET,
            ),
        ),
    ];
    for (what, token) in cases {
        assert_eq!(
            connack5(addr, "j", Some(("ignored", &token))).await,
            ConnectReturnCode::BadUserNamePassword,
            "{what}"
        );
    }
    // A token signed with RS256 while HS256 is configured is refused too.
    let rs = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims(serde_json::json!({})),
        &EncodingKey::from_rsa_pem(&fixture("jwt-rs256.key")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        connack5(addr, "j", Some(("ignored", &rs))).await,
        ConnectReturnCode::BadUserNamePassword
    );
    // A token bound to another client id.
    let bound = hs256(
        &claims(serde_json::json!({"mqtt_client_id": "other"})),
        HS_SECRET,
    );
    assert_eq!(
        connack5(addr, "j", Some(("ignored", &bound))).await,
        ConnectReturnCode::NotAuthorized
    );
}

#[tokio::test]
async fn jwt_claims_set_type_and_acl() {
    let (_server, addr) = start_jwt(jwt_config("HS256", None)).await;
    let token = hs256(
        &claims(serde_json::json!({
            "mqtt_client_type": "application",
            "mqtt_publish": ["telemetry/${username}/#"],
            "mqtt_subscribe": ["commands/${username}"],
        })),
        HS_SECRET,
    );
    let (mut c, ack) = connect5_login(addr, "jwt-app", Some(("whatever", &token)), None).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert_eq!(
        ack.properties.and_then(|p| p.session_expiry_interval),
        Some(u32::MAX),
        "mqtt_client_type=application makes the session an APPLICATION session"
    );
    // `${username}` is the token's `sub`, not the CONNECT user name.
    c.publish5(publish5_packet(
        "telemetry/sensor-7/t",
        QoS::AtLeastOnce,
        1,
        false,
        b"1",
    ))
    .await;
    assert_puback(&mut c, 1, false).await;
    c.publish5(publish5_packet(
        "telemetry/whatever/t",
        QoS::AtLeastOnce,
        2,
        false,
        b"1",
    ))
    .await;
    assert_puback(&mut c, 2, true).await;
    let ack = c
        .subscribe5(3, filter5("commands/sensor-7", QoS::AtLeastOnce), None)
        .await;
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let ack = c
        .subscribe5(4, filter5("commands/+", QoS::AtLeastOnce), None)
        .await;
    assert_eq!(ack.return_codes, vec![SubscribeReasonCode::NotAuthorized]);
}

#[tokio::test]
async fn jwt_es256_and_rs256() {
    let cases = [
        ("ES256", "jwt-es256.pub", "jwt-es256.key", Algorithm::ES256),
        ("RS256", "jwt-rs256.pub", "jwt-rs256.key", Algorithm::RS256),
    ];
    for (alg, public, private, algorithm) in cases {
        let (_server, addr) = start_jwt(jwt_config(alg, Some(public))).await;
        let key = if algorithm == Algorithm::ES256 {
            EncodingKey::from_ec_pem(&fixture(private)).unwrap()
        } else {
            EncodingKey::from_rsa_pem(&fixture(private)).unwrap()
        };
        let token = jsonwebtoken::encode(
            &Header::new(algorithm),
            &claims(serde_json::json!({"mqtt_publish": ["#"]})),
            &key,
        )
        .unwrap();
        assert_eq!(
            connack5(addr, "k", Some(("u", &token))).await,
            ConnectReturnCode::Success,
            "{alg}"
        );
        if algorithm == Algorithm::ES256 {
            let other = EncodingKey::from_ec_pem(&fixture("jwt-es256-other.key")).unwrap();
            let forged = jsonwebtoken::encode(
                &Header::new(algorithm),
                &claims(serde_json::json!({})),
                &other,
            )
            .unwrap();
            assert_eq!(
                connack5(addr, "k", Some(("u", &forged))).await,
                ConnectReturnCode::BadUserNamePassword,
                "ES256 signed by another key"
            );
        }
    }
}

#[tokio::test]
async fn non_jwt_passwords_fall_through_to_the_store() {
    let (server, addr) = start_jwt(jwt_config("HS256", None)).await;
    let store = server.broker.auth.credential_store().unwrap();
    store
        .put(user("carol", "plain-password", AclRules::everything()))
        .await
        .unwrap();
    assert_eq!(
        connack5(addr, "c", Some(("carol", "plain-password"))).await,
        ConnectReturnCode::Success
    );
}

// --- ACLs ----------------------------------------------------------------------------------

async fn assert_puback(c: &mut Raw, pkid: u16, denied: bool) {
    match c.recv5().await {
        Packet::PubAck(a) => {
            assert_eq!(a.pkid, pkid);
            if denied {
                assert_eq!(a.reason, PubAckReason::NotAuthorized);
            } else {
                assert!(
                    matches!(
                        a.reason,
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                    ),
                    "{:?}",
                    a.reason
                );
            }
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// A broker with `admin` (everything) and `dev` (a device's own subtree).
async fn start_acl(tweak: impl FnOnce(&mut Config)) -> (Server, SocketAddr) {
    let (server, addr, store) = start_auth(&[AuthProviderKind::Store], tweak).await;
    store
        .put(user("admin", "pw", AclRules::everything()))
        .await
        .unwrap();
    store
        .put(user(
            "dev",
            "pw",
            rules(
                &["devices/${client_id}/#", "public/${client_id}"],
                &["devices/${client_id}/#", "public/#", "$share/ignored"],
            ),
        ))
        .await
        .unwrap();
    (server, addr)
}

#[tokio::test]
async fn publish_denied_v5_gets_0x87_and_is_not_routed() {
    let (_server, addr) = start_acl(|_| {}).await;
    let (mut watcher, _) = connect5_login(addr, "watch", Some(("admin", "pw")), None).await;
    watcher
        .subscribe5(1, filter5("#", QoS::AtLeastOnce), None)
        .await;
    let (mut d, ack) = connect5_login(addr, "d1", Some(("dev", "pw")), None).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    d.publish5(publish5_packet(
        "devices/d2/cmd",
        QoS::AtLeastOnce,
        1,
        false,
        b"x",
    ))
    .await;
    assert_puback(&mut d, 1, true).await;
    d.publish5(publish5_packet(
        "devices/d2/cmd",
        QoS::ExactlyOnce,
        2,
        false,
        b"x",
    ))
    .await;
    match d.recv5().await {
        Packet::PubRec(r) => assert_eq!(r.reason, PubRecReason::NotAuthorized),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    d.publish5(publish5_packet(
        "devices/d2/cmd",
        QoS::AtMostOnce,
        0,
        false,
        b"x",
    ))
    .await;
    // The allowed one arrives, and only it.
    d.publish5(publish5_packet(
        "devices/d1/state",
        QoS::AtLeastOnce,
        3,
        false,
        b"ok",
    ))
    .await;
    assert_puback(&mut d, 3, false).await;
    let p = watcher.recv_publish5().await;
    assert_eq!(&p.topic[..], b"devices/d1/state");
    assert!(watcher.recv5_within(QUIET).await.is_none());
}

#[tokio::test]
async fn publish_denied_v3_dropped_or_disconnected_per_config() {
    let (server, addr) = start_acl(|_| {}).await;
    let (mut watcher, _) = connect5_login(addr, "watch", Some(("admin", "pw")), None).await;
    watcher
        .subscribe5(1, filter5("#", QoS::AtLeastOnce), None)
        .await;
    let (mut d, _) = connect4_login(addr, "d1", Some(("dev", "pw")), None).await;
    d.publish4(
        "devices/d2/x",
        rumqttc::mqttbytes::QoS::AtLeastOnce,
        5,
        false,
        b"x",
    )
    .await;
    // v3 can only acknowledge; the message is dropped.
    match d.recv4().await {
        v4::Packet::PubAck(a) => assert_eq!(a.pkid, 5),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    d.publish4(
        "devices/d2/x",
        rumqttc::mqttbytes::QoS::ExactlyOnce,
        6,
        false,
        b"x",
    )
    .await;
    match d.recv4().await {
        v4::Packet::PubRec(r) => assert_eq!(r.pkid, 6),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    d.send4(v4::Packet::PubRel(v4::PubRel::new(6))).await;
    match d.recv4().await {
        v4::Packet::PubComp(c) => assert_eq!(c.pkid, 6),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    assert!(watcher.recv5_within(QUIET).await.is_none());
    assert_eq!(server.broker.metrics.messages_dropped_acl.get(), 2);
    drop(server);

    let (_server, addr) =
        start_acl(|c| c.auth.v3_denied_publish = V3DeniedPublish::Disconnect).await;
    let (mut d, _) = connect4_login(addr, "d1", Some(("dev", "pw")), None).await;
    d.publish4(
        "devices/d2/x",
        rumqttc::mqttbytes::QoS::AtLeastOnce,
        5,
        false,
        b"x",
    )
    .await;
    let rest = d.closed_within(common::WAIT).await.expect("disconnected");
    assert!(rest.is_empty(), "no PUBACK before the close: {rest:?}");
}

#[tokio::test]
async fn subscribe_denials_per_filter_v5_and_v3() {
    let (_server, addr) = start_acl(|_| {}).await;
    let (mut d, _) = connect5_login(addr, "d1", Some(("dev", "pw")), None).await;
    d.send5(Packet::Subscribe(v5::Subscribe {
        pkid: 1,
        filters: vec![
            filter5("devices/d1/#", QoS::AtLeastOnce),
            filter5("devices/+/cmd", QoS::AtLeastOnce),
            filter5("#", QoS::AtMostOnce),
            filter5("$share/g/public/news", QoS::AtLeastOnce),
            filter5("$share/g/devices/d2/x", QoS::AtLeastOnce),
        ],
        properties: None,
    }))
    .await;
    match d.recv5().await {
        Packet::SubAck(ack) => assert_eq!(
            ack.return_codes,
            vec![
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::NotAuthorized,
                SubscribeReasonCode::NotAuthorized,
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::NotAuthorized,
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let (mut d3, _) = connect4_login(addr, "d3", Some(("dev", "pw")), None).await;
    let mut s = v4::Subscribe::new("devices/d3/#", rumqttc::mqttbytes::QoS::AtLeastOnce);
    s.pkid = 2;
    s.filters.push(v4::SubscribeFilter::new(
        "devices/d1/#".into(),
        rumqttc::mqttbytes::QoS::AtLeastOnce,
    ));
    d3.send4(v4::Packet::Subscribe(s)).await;
    match d3.recv4().await {
        v4::Packet::SubAck(ack) => assert_eq!(
            ack.return_codes,
            vec![
                v4::SubscribeReasonCode::Success(rumqttc::mqttbytes::QoS::AtLeastOnce),
                v4::SubscribeReasonCode::Failure,
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn will_on_a_denied_topic_is_refused_at_connect() {
    let (_server, addr) = start_acl(|_| {}).await;
    let will = v5::LastWill::new("devices/d2/status", "gone", QoS::AtLeastOnce, false, None);
    let (_c, ack) = connect5_login(addr, "d1", Some(("dev", "pw")), Some(will)).await;
    assert_eq!(ack.code, ConnectReturnCode::NotAuthorized);
    let will = v5::LastWill::new("devices/d1/status", "gone", QoS::AtLeastOnce, false, None);
    let (_c, ack) = connect5_login(addr, "d1", Some(("dev", "pw")), Some(will)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let will = v4::LastWill::new(
        "devices/d2/status",
        "gone",
        rumqttc::mqttbytes::QoS::AtMostOnce,
        false,
    );
    let (_c, ack) = connect4_login(addr, "d9", Some(("dev", "pw")), Some(will)).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::NotAuthorized);
}

#[tokio::test]
async fn retained_messages_only_through_allowed_filters() {
    let (_server, addr) = start_acl(|_| {}).await;
    let (mut admin, _) = connect5_login(addr, "adm", Some(("admin", "pw")), None).await;
    for (pkid, topic) in [
        (1, "secret/plans"),
        (2, "public/news"),
        (3, "devices/d2/cfg"),
    ] {
        admin
            .publish5(publish5_packet(topic, QoS::AtLeastOnce, pkid, true, b"r"))
            .await;
        assert_puback(&mut admin, pkid, false).await;
    }
    let (mut d, _) = connect5_login(addr, "d1", Some(("dev", "pw")), None).await;
    let ack = d.subscribe5(1, filter5("#", QoS::AtLeastOnce), None).await;
    assert_eq!(ack.return_codes, vec![SubscribeReasonCode::NotAuthorized]);
    let ack = d
        .subscribe5(2, filter5("+/+", QoS::AtLeastOnce), None)
        .await;
    assert_eq!(ack.return_codes, vec![SubscribeReasonCode::NotAuthorized]);
    assert!(
        d.recv5_within(QUIET).await.is_none(),
        "retained messages leaked through a denied filter"
    );
    let ack = d
        .subscribe5(3, filter5("public/#", QoS::AtLeastOnce), None)
        .await;
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let p = d.recv_publish5().await;
    assert_eq!(&p.topic[..], b"public/news");
    assert!(p.retain);
    assert!(d.recv5_within(QUIET).await.is_none());
}

#[tokio::test]
async fn wildcard_client_ids_do_not_widen_client_id_patterns() {
    let (_server, addr) = start_acl(|_| {}).await;
    let (mut victim_watch, _) = connect5_login(addr, "watch", Some(("admin", "pw")), None).await;
    victim_watch
        .subscribe5(1, filter5("devices/#", QoS::AtLeastOnce), None)
        .await;
    for evil in ["+", "#", "a/b"] {
        let (mut c, ack) = connect5_login(addr, evil, Some(("dev", "pw")), None).await;
        assert_eq!(ack.code, ConnectReturnCode::Success, "{evil}");
        for (pkid, filter) in [
            (1, "devices/+/cmd"),
            (2, "devices/#"),
            (3, "devices/victim/#"),
        ] {
            let ack = c
                .subscribe5(pkid, filter5(filter, QoS::AtLeastOnce), None)
                .await;
            assert_eq!(
                ack.return_codes,
                vec![SubscribeReasonCode::NotAuthorized],
                "client id {evil:?} subscribing {filter}"
            );
        }
        c.publish5(publish5_packet(
            "devices/victim/cmd",
            QoS::AtLeastOnce,
            9,
            false,
            b"x",
        ))
        .await;
        assert_puback(&mut c, 9, true).await;
    }
    assert!(victim_watch.recv5_within(QUIET).await.is_none());
}

#[tokio::test]
async fn anonymous_clients_get_the_configured_acl() {
    let (_server, addr, _) = start_auth(&[AuthProviderKind::Store], |c| {
        c.auth.allow_anonymous = true;
        c.auth.anonymous_acl = rules(&["guest/${client_id}"], &["guest/#"]);
    })
    .await;
    let (mut g, ack) = connect5_login(addr, "g1", None, None).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    g.publish5(publish5_packet(
        "guest/g1",
        QoS::AtLeastOnce,
        1,
        false,
        b"x",
    ))
    .await;
    assert_puback(&mut g, 1, false).await;
    g.publish5(publish5_packet(
        "guest/g2",
        QoS::AtLeastOnce,
        2,
        false,
        b"x",
    ))
    .await;
    assert_puback(&mut g, 2, true).await;
    let ack = g
        .subscribe5(3, filter5("other/#", QoS::AtMostOnce), None)
        .await;
    assert_eq!(ack.return_codes, vec![SubscribeReasonCode::NotAuthorized]);
    // Presented credentials must still be right: anonymous is for clients without any.
    assert_eq!(
        connack5(addr, "g2", Some(("nobody", "x"))).await,
        ConnectReturnCode::BadUserNamePassword
    );
}

// --- X.509 mapping (the TLS listener itself is tested with the TLS listeners) ---------------

#[tokio::test]
async fn x509_subject_cn_maps_to_a_credential() {
    use ferrymq::auth::chain::AuthChain;
    use ferrymq::auth::embedded::EmbeddedCredentials;
    use ferrymq::auth::{AuthDecision, Authenticator, ClientCertificate, Credentials};
    use ferrymq::config::X509Lookup;

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedCredentials::open(dir.path()).unwrap());
    store
        .put(CredentialRecord {
            username: Some("device-42".into()),
            client_id: Some("dev42".into()),
            password_hash: None,
            client_type: Some(ClientType::Device),
            acl: rules(&["devices/${username}/#"], &[]),
        })
        .await
        .unwrap();
    let mut config = Config::default();
    config.auth.providers = vec![AuthProviderKind::X509, AuthProviderKind::Store];
    config.auth.x509.cn_regex = r"(device-\d+)\.example\.com".into();
    config.auth.failure_burst = 0;
    let chain = AuthChain::new(&config, store.clone()).unwrap();
    let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
    let cert = |cn: &str| ClientCertificate {
        subject_cn: Some(cn.into()),
        chain_der: Vec::new(),
    };
    let creds = |client_id: &'static str, cert: Option<&'static ClientCertificate>| Credentials {
        client_id,
        username: None,
        password: None,
        peer,
        client_cert: cert,
        listener: "tls",
    };
    let good: &'static ClientCertificate = Box::leak(Box::new(cert("device-42.example.com")));
    match chain.authenticate(&creds("dev42", Some(good))).await {
        AuthDecision::Allow(id) => {
            assert_eq!(id.via, "x509");
            assert_eq!(id.username.as_deref(), Some("device-42"));
            let acl = id.acl.resolve("dev42", id.username.as_deref());
            assert!(acl.may_publish("devices/device-42/t"));
            assert!(!acl.may_publish("devices/device-43/t"));
        }
        other => panic!("expected Allow, got {other:?}"),
    }
    // The record binds the user to client id dev42.
    assert_eq!(
        chain.authenticate(&creds("dev43", Some(good))).await,
        AuthDecision::NotAuthorized
    );
    // A CN that does not match the whole pattern, or maps to no record, is not accepted.
    for cn in ["device-42.example.com.evil", "device-99.example.com", "x"] {
        let other: &'static ClientCertificate = Box::leak(Box::new(cert(cn)));
        assert_eq!(
            chain.authenticate(&creds("dev42", Some(other))).await,
            AuthDecision::NotAuthorized,
            "{cn}"
        );
    }
    // No certificate at all (a plain TCP listener): anonymous access is off.
    assert_eq!(
        chain.authenticate(&creds("dev42", None)).await,
        AuthDecision::NotAuthorized
    );

    // Lookup by client id.
    store
        .put(CredentialRecord {
            username: None,
            client_id: Some("gw-7".into()),
            password_hash: None,
            client_type: Some(ClientType::Application),
            acl: AclRules::everything(),
        })
        .await
        .unwrap();
    config.auth.x509.cn_regex = String::new();
    config.auth.x509.lookup = X509Lookup::ClientId;
    let chain = AuthChain::new(&config, store).unwrap();
    let gw: &'static ClientCertificate = Box::leak(Box::new(cert("gw-7")));
    match chain.authenticate(&creds("gw-7", Some(gw))).await {
        AuthDecision::Allow(id) => assert_eq!(
            id.client_type,
            Some(ferrymq::storage::ClientKind::Application)
        ),
        other => panic!("expected Allow, got {other:?}"),
    }
}

// --- malformed CONNECT / credentials -------------------------------------------------------

/// A CONNECT with protocol level `level`, `flags` and a raw payload (client id and the rest).
fn raw_connect(level: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags, 0, 30];
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend_from_slice(payload);
    let mut out = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&body);
    out
}

fn mqtt_str(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

#[tokio::test]
async fn malformed_connect_credentials_get_clean_refusals() {
    let (server, addr, store) =
        start_auth(&[AuthProviderKind::Jwt, AuthProviderKind::Store], |c| {
            c.auth.jwt = Some(jwt_config("HS256", None));
            c.auth.failure_burst = 0;
        })
        .await;
    store
        .put(user("ok", "pw", AclRules::everything()))
        .await
        .unwrap();
    let id = mqtt_str(b"m1");
    let huge = vec![b'a'; 65_535];
    let corpus: Vec<(&str, Vec<u8>)> = vec![
        (
            "v3.1.1 user name not UTF-8",
            raw_connect(4, 0x82, &cat(&[id.clone(), mqtt_str(&[0xff, 0xfe, 0x41])])),
        ),
        (
            "v5 user name not UTF-8",
            raw_connect(5, 0x82, &cat(&[id.clone(), mqtt_str(&[0xc3, 0x28])])),
        ),
        (
            "user name with U+0000",
            raw_connect(4, 0x82, &cat(&[id.clone(), mqtt_str(b"a\0b")])),
        ),
        (
            "v3.1.1 password without user name",
            raw_connect(4, 0x42, &cat(&[id.clone(), mqtt_str(b"pw")])),
        ),
        (
            "password length beyond the packet",
            raw_connect(
                4,
                0xc2,
                &cat(&[id.clone(), mqtt_str(b"ok"), vec![0xff, 0xff, b'p', b'w']]),
            ),
        ),
        ("user name flag but no user name", raw_connect(4, 0x82, &id)),
        (
            "user name length beyond the packet",
            raw_connect(5, 0x82, &cat(&[id.clone(), vec![0x80, 0x00, b'x']])),
        ),
        (
            "remaining length far beyond the packet size limit",
            vec![
                0x10, 0xff, 0xff, 0xff, 0x7f, 0, 4, b'M', b'Q', b'T', b'T', 4,
            ],
        ),
        (
            "reserved flag bit set",
            raw_connect(4, 0x83, &cat(&[id.clone(), mqtt_str(b"ok")])),
        ),
    ];
    for (what, bytes) in &corpus {
        let mut c = Raw::connect(addr).await;
        c.send_bytes(bytes).await;
        let rest = c
            .closed_within(common::WAIT)
            .await
            .unwrap_or_else(|| panic!("{what}: connection left open"));
        // Either closed silently or after a refusing CONNACK.
        if !rest.is_empty() {
            assert_eq!(rest[0], 0x20, "{what}: {rest:?}");
            assert_ne!(rest.get(3), Some(&0), "{what}: accepted? {rest:?}");
        }
    }
    // Well-formed but hostile: the longest possible password, as a user name/password and as a
    // would-be token. Refused with 0x86, not a crash or a hang.
    let long = String::from_utf8(huge).unwrap();
    assert_eq!(
        connack5(addr, "m2", Some(("ok", &long))).await,
        ConnectReturnCode::BadUserNamePassword
    );
    let fake_jwt = format!(
        "{}.{}.{}",
        &long[..20_000],
        &long[..20_000],
        &long[..20_000]
    );
    assert_eq!(
        connack5(addr, "m3", Some(("ok", &fake_jwt))).await,
        ConnectReturnCode::BadUserNamePassword
    );
    let not_json = "eyJub3QiOiJqc29u.eyJhIjoxfQ.c2ln";
    assert_eq!(
        connack5(addr, "m4", Some(("ok", not_json))).await,
        ConnectReturnCode::BadUserNamePassword
    );
    // The broker still serves others.
    let (mut sub, ack) = connect5_login(addr, "s", Some(("ok", "pw")), None).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    sub.subscribe5(1, filter5("t", QoS::AtLeastOnce), None)
        .await;
    let (mut publ, _) = connect5_login(addr, "p", Some(("ok", "pw")), None).await;
    publ.publish5(publish5_packet("t", QoS::AtLeastOnce, 1, false, b"alive"))
        .await;
    assert_puback(&mut publ, 1, false).await;
    assert_eq!(&sub.recv_publish5().await.payload[..], b"alive");
    assert!(server.broker.metrics.protocol_errors.get() >= corpus.len() as u64 - 1);
}

#[tokio::test]
async fn v5_client_id_with_password_and_no_user_name() {
    let (_server, addr, store) = start_auth(&[AuthProviderKind::Store], |c| {
        c.auth.failure_burst = 0;
    })
    .await;
    store
        .put(CredentialRecord {
            username: None,
            client_id: Some("gw-1".into()),
            password_hash: Some(password::hash(b"gw-secret").unwrap()),
            client_type: None,
            acl: AclRules::everything(),
        })
        .await
        .unwrap();
    // v5 allows a password without a user name (3.1.2.9): flags 0x42 = password + clean start.
    let attempt = |pw: &'static [u8]| async move {
        let mut c = Raw::connect(addr).await;
        c.send_bytes(&raw_connect(
            5,
            0x42,
            &cat(&[mqtt_str(b"gw-1"), mqtt_str(pw)]),
        ))
        .await;
        match c.recv5().await {
            Packet::ConnAck(ack) => ack.code,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    };
    assert_eq!(attempt(b"gw-secret").await, ConnectReturnCode::Success);
    assert_eq!(
        attempt(b"wrong").await,
        ConnectReturnCode::BadUserNamePassword
    );
    // The client id is reserved by its password: connecting without one is refused.
    assert_eq!(
        connack5(addr, "gw-1", None).await,
        ConnectReturnCode::BadUserNamePassword
    );
}

#[tokio::test]
async fn rumqttc_client_logs_in_with_credentials() {
    use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions};

    let (_server, addr, store) = start_auth(&[AuthProviderKind::Store], |_| {}).await;
    store
        .put(user("lib", "lib-pw", rules(&["lib/#"], &["lib/#"])))
        .await
        .unwrap();
    let connect = |pw: &str| {
        let mut opts = MqttOptions::new("lib-client", addr.ip().to_string(), addr.port());
        opts.set_credentials("lib", pw);
        AsyncClient::new(opts, 10)
    };
    let (_client, mut eventloop) = connect("lib-pw");
    match tokio::time::timeout(common::WAIT, eventloop.poll()).await {
        Ok(Ok(Event::Incoming(rumqttc::Packet::ConnAck(ack)))) => {
            assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let (_client, mut eventloop) = connect("nope");
    match tokio::time::timeout(common::WAIT, eventloop.poll()).await {
        Ok(Err(ConnectionError::ConnectionRefused(code))) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::BadUserNamePassword)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn taking_over_a_client_id_does_not_inherit_what_the_acl_denies() {
    let (server, addr) = start_acl(|_| {}).await;
    // `admin` leaves a persistent session on client id `shared` subscribed to everything.
    let mut c = Raw::connect(addr).await;
    c.send5(Packet::Connect(
        connect5_packet("shared", true, 3600),
        None,
        Some(v5::Login::new("admin", "pw")),
    ))
    .await;
    assert!(matches!(c.recv5().await, Packet::ConnAck(a) if a.code == ConnectReturnCode::Success));
    c.subscribe5(1, filter5("#", QoS::AtLeastOnce), None).await;
    c.disconnect5(v5::DisconnectReasonCode::NormalDisconnection, None)
        .await;
    drop(c);
    // A message for it is queued while it is away.
    let (mut admin, _) = connect5_login(addr, "adm", Some(("admin", "pw")), None).await;
    admin
        .publish5(publish5_packet(
            "secret/plans",
            QoS::AtLeastOnce,
            1,
            false,
            b"x",
        ))
        .await;
    assert_puback(&mut admin, 1, false).await;
    // `dev` resumes the same client id: the session is there, its secrets are not.
    let mut d = Raw::connect(addr).await;
    d.send5(Packet::Connect(
        connect5_packet("shared", false, 3600),
        None,
        Some(v5::Login::new("dev", "pw")),
    ))
    .await;
    match d.recv5().await {
        Packet::ConnAck(a) => {
            assert_eq!(a.code, ConnectReturnCode::Success);
            assert!(a.session_present);
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    assert!(
        d.recv5_within(QUIET).await.is_none(),
        "a message queued for another identity was delivered"
    );
    // The inherited `#` subscription was removed at CONNECT.
    assert_eq!(server.broker.metrics.subscriptions_denied_acl.get(), 1);
    admin
        .publish5(publish5_packet(
            "secret/more",
            QoS::AtLeastOnce,
            2,
            false,
            b"y",
        ))
        .await;
    assert_puback(&mut admin, 2, false).await;
    assert!(
        d.recv5_within(QUIET).await.is_none(),
        "the inherited `#` subscription still routes"
    );
}
