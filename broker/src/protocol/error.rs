//! Errors of the wire layer and the reason codes they call for.

use super::{ConnectReturnCode, DisconnectReasonCode, ProtocolVersion};

/// A reason to close the connection, found while decoding what a client sent.
///
/// Every variant maps to the v5 DISCONNECT reason the server should send (where a DISCONNECT
/// may be sent at all: only after CONNACK, and only to v5 clients) and, for errors found
/// while reading CONNECT, to the CONNACK the spec asks for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The bytes do not form a valid packet (v5 0x81).
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// The packet is well formed but not allowed here (v5 0x82).
    #[error("protocol error: {0}")]
    ProtocolViolation(String),
    /// The whole packet (fixed header included) is larger than we accept (v5 0x95).
    #[error("packet of {size} bytes exceeds the maximum packet size {max}")]
    PacketTooLarge { size: usize, max: u32 },
    /// A PUBLISH or will topic that is not a valid topic name (v5 0x90).
    #[error("invalid topic name: {0}")]
    TopicNameInvalid(String),
    /// CONNECT named a protocol or level we do not speak. With the name `MQTT`/`MQIsdp` the
    /// server answers CONNACK "unsupported protocol version" first; with any other name it
    /// just closes ([MQTT-3.1.2-1], [MQTT-3.1.2-2]).
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocolVersion { name: String, level: u8 },
    /// A v3 CONNECT whose client identifier the server must reject with CONNACK 0x02
    /// ([MQTT-3.1.3-8]: empty id with clean session 0; 3.1: empty id).
    #[error("client identifier not valid")]
    ClientIdentifierNotValid,
    /// The first packet on a connection was not CONNECT ([MQTT-3.1.0-1]).
    #[error("first packet was not CONNECT")]
    FirstPacketNotConnect,
}

impl ProtocolError {
    pub(crate) fn malformed(msg: impl Into<String>) -> Self {
        Self::Malformed(msg.into())
    }

    pub(crate) fn violation(msg: impl Into<String>) -> Self {
        Self::ProtocolViolation(msg.into())
    }

    /// The v5 DISCONNECT reason this error calls for.
    pub fn disconnect_reason(&self) -> DisconnectReasonCode {
        match self {
            Self::Malformed(_) => DisconnectReasonCode::MalformedPacket,
            Self::ProtocolViolation(_) | Self::FirstPacketNotConnect => {
                DisconnectReasonCode::ProtocolError
            }
            Self::PacketTooLarge { .. } => DisconnectReasonCode::PacketTooLarge,
            Self::TopicNameInvalid(_) => DisconnectReasonCode::TopicNameInvalid,
            // Only raised while reading CONNECT, where a DISCONNECT is never sent (the
            // connection gets a CONNACK or is simply closed); ProtocolError is the nearest code.
            Self::UnsupportedProtocolVersion { .. } | Self::ClientIdentifierNotValid => {
                DisconnectReasonCode::ProtocolError
            }
        }
    }

    /// For an error while reading CONNECT: the CONNACK code to answer with before closing, or
    /// `None` when the connection is simply closed. Encode it with the version given by
    /// [`ProtocolError::connack_version`]; `encode` maps the code to the v3 return code.
    pub fn connack_code(&self) -> Option<ConnectReturnCode> {
        match self {
            Self::UnsupportedProtocolVersion { name, .. } if is_mqtt_name(name) => {
                Some(ConnectReturnCode::UnsupportedProtocolVersion)
            }
            Self::ClientIdentifierNotValid => Some(ConnectReturnCode::ClientIdentifierNotValid),
            // v5 says the server MAY send CONNACK 0x81/0x82 for a bad CONNECT; v3 has no code
            // for it. Closing without CONNACK is correct for every version, so we do that.
            _ => None,
        }
    }

    /// The version whose CONNACK encoding to use with [`ProtocolError::connack_code`].
    ///
    /// A level we do not know at all (not 3, 4 or 5) is answered in the v5 format (0x84,
    /// v5 §3.1.2.2): such a client is newer than 3.1.1 and reads a v5 CONNACK, and a v5 CONNACK
    /// is what every client from 5.0 on expects. A known level under the wrong name (`MQTT` 3,
    /// `MQIsdp` 4) comes from an old client that reads the 2-byte v3 CONNACK (0x01,
    /// [MQTT-3.1.2-2] of 3.1.1).
    pub fn connack_version(&self) -> Option<ProtocolVersion> {
        match self {
            Self::UnsupportedProtocolVersion { name, level } if is_mqtt_name(name) => {
                Some(if matches!(level, 3..=5) {
                    ProtocolVersion::V3_1_1
                } else {
                    ProtocolVersion::V5
                })
            }
            // Only v3 clients get this error; 3.1 and 3.1.1 refusals are byte-identical
            // (session present is 0 in a refusal).
            Self::ClientIdentifierNotValid => Some(ProtocolVersion::V3_1_1),
            _ => None,
        }
    }
}

fn is_mqtt_name(name: &str) -> bool {
    name == "MQTT" || name == "MQIsdp"
}

/// Why a server→client packet could not be encoded. Nothing is written to `out` then.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded packet would exceed the client's Maximum Packet Size.
    #[error("packet of {size} bytes exceeds the client's maximum packet size {max}")]
    TooLarge { size: usize, max: u32 },
    /// The packet cannot be expressed in this version (AUTH for v3, a failure reason in a v3
    /// PUBACK/PUBREC, an empty alias-only topic for v3) or is not a server→client packet.
    #[error("cannot encode {packet} for {version:?}: {why}")]
    NotRepresentable {
        packet: &'static str,
        version: ProtocolVersion,
        why: &'static str,
    },
    /// The packet itself is invalid (e.g. QoS>0 PUBLISH with packet id 0, remaining length
    /// beyond 268,435,455) and rumqttc refused it.
    #[error("invalid packet: {0}")]
    Invalid(String),
}
