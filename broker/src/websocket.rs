//! The WebSocket upgrade for `ws` and `wss` listeners (MQTT 5.0 §6, 3.1.1 §6).
//!
//! The request must target the listener's `path` and offer the `mqtt` subprotocol
//! [MQTT-6.0.0-3]; the broker answers with `mqtt` [MQTT-6.0.0-4]. `mqttv3.1`, which old 3.1
//! clients offer, is accepted too. Anything else gets an HTTP error and no upgrade. Frames and
//! messages are bounded by the packet size limit, so one client cannot make the broker buffer
//! more than one largest packet's worth per frame.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::connection::transport::WsIo;

/// Subprotocols accepted, in order of preference.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Runs the HTTP upgrade on `stream`.
// tungstenite's callback type fixes the large error (an HTTP response).
#[allow(clippy::result_large_err)]
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    path: &str,
    max_packet_size: u32,
) -> Result<WsIo<S>, tokio_tungstenite::tungstenite::Error> {
    // A message may carry a whole packet plus the start of the next; beyond that is abuse.
    let limit = (max_packet_size as usize).saturating_mul(2).max(64 * 1024);
    let config = WebSocketConfig::default()
        .max_frame_size(Some(limit))
        .max_message_size(Some(limit));
    let path = path.to_owned();
    let callback = move |request: &Request, mut response: Response| {
        if request.uri().path() != path {
            return Err(error(
                StatusCode::NOT_FOUND,
                "no MQTT endpoint at this path",
            ));
        }
        let offered: Vec<&str> = request
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let Some(chosen) = SUBPROTOCOLS.iter().find(|p| offered.contains(p)) else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "the `mqtt` WebSocket subprotocol is required",
            ));
        };
        response
            .headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_static(chosen));
        Ok(response)
    };
    let ws =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await?;
    Ok(WsIo::new(ws))
}

fn error(status: StatusCode, why: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(why.to_owned()));
    *response.status_mut() = status;
    response
}
