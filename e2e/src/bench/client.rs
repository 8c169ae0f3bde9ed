//! Connection setup shared by the load roles: TCP connect, CONNECT/CONNACK, SUBSCRIBE/SUBACK.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::codec::{self, Incoming, QoS};

/// Keep-alive the benchmark clients announce; runs are far shorter, so no PINGREQ is needed.
pub const KEEP_ALIVE_SECS: u16 = 600;
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Reads until one whole packet is buffered and hands it to `f`; later bytes stay in `buf`.
async fn read_one<T>(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    mut f: impl FnMut(Incoming<'_>) -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    loop {
        while let Some((packet, used)) = codec::decode(buf)? {
            let out = f(packet)?;
            buf.advance(used);
            if let Some(out) = out {
                return Ok(out);
            }
        }
        if stream.read_buf(buf).await? == 0 {
            bail!("broker closed the connection during setup");
        }
    }
}

/// Opens a TCP connection (optionally from a given local address) and completes CONNECT.
/// Returns the stream and whatever the broker sent after CONNACK.
pub async fn connect(
    addr: SocketAddr,
    local: Option<IpAddr>,
    client_id: &str,
    clean_session: bool,
) -> anyhow::Result<(TcpStream, BytesMut)> {
    tokio::time::timeout(SETUP_TIMEOUT, async {
        let mut stream = match local {
            Some(ip) => {
                let socket = if ip.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                // Let connect() pick the port: bind(ip:0) alone searches for a port unused on
                // that address, which gets slow (and runs out) with tens of thousands of sockets.
                #[cfg(target_os = "linux")]
                {
                    use std::os::fd::AsRawFd;
                    let one: libc::c_int = 1;
                    // SAFETY: plain setsockopt on a socket we own, with a c_int option value.
                    unsafe {
                        libc::setsockopt(
                            socket.as_raw_fd(),
                            libc::IPPROTO_IP,
                            libc::IP_BIND_ADDRESS_NO_PORT,
                            (&one as *const libc::c_int).cast(),
                            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                        );
                    }
                }
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(addr).await?
            }
            None => TcpStream::connect(addr).await?,
        };
        stream.set_nodelay(true)?;
        let mut out = BytesMut::with_capacity(64 + client_id.len());
        codec::connect(&mut out, client_id, clean_session, KEEP_ALIVE_SECS);
        stream.write_all(&out).await?;
        let mut buf = BytesMut::with_capacity(256);
        read_one(&mut stream, &mut buf, |p| match p {
            Incoming::ConnAck { code: 0, .. } => Ok(Some(())),
            Incoming::ConnAck { code, .. } => bail!("CONNACK refused, code {code}"),
            other => bail!("expected CONNACK, got {other:?}"),
        })
        .await?;
        anyhow::Ok((stream, buf))
    })
    .await
    .with_context(|| format!("connecting {client_id} to {addr}: timed out"))?
    .with_context(|| format!("connecting {client_id} to {addr}"))
}

/// Subscribes to one filter and waits for a successful SUBACK.
pub async fn subscribe(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    filter: &str,
    qos: QoS,
) -> anyhow::Result<()> {
    tokio::time::timeout(SETUP_TIMEOUT, async {
        let mut out = BytesMut::new();
        codec::subscribe(&mut out, 1, filter, qos);
        stream.write_all(&out).await?;
        read_one(stream, buf, |p| match p {
            Incoming::SubAck { pkid: 1, codes } => match codes.first() {
                Some(&c) if c <= 2 => Ok(Some(())),
                _ => bail!("SUBACK refused {filter}: {codes:?}"),
            },
            // A persistent session may get queued messages of an earlier run; ignore them.
            Incoming::Publish { .. } => Ok(None),
            other => bail!("expected SUBACK, got {other:?}"),
        })
        .await
    })
    .await
    .with_context(|| format!("subscribing to {filter}: timed out"))?
}
