//! The byte streams a connection runs over: plain TCP, TLS, WebSocket and WebSocket over TLS.
//!
//! The connection task is generic over [`Io`], so each kind gets its own compiled loop and plain
//! TCP keeps its fast path: wait for readability, then read straight into the connection's
//! buffer (no buffer held while idle, no lock, no extra task). TLS and WebSocket streams are split
//! with `tokio::io::split` (an uncontended lock, one task) and read with `read_buf`; their writes
//! may sit in a TLS record or WebSocket frame buffer until flushed, which [`Io::BUFFERED`] tells
//! the loop.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// An accepted, fully set-up stream (TLS and WebSocket handshakes done), ready for CONNECT.
pub enum Transport {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Ws(Box<WsIo<TcpStream>>),
    Wss(Box<WsIo<TlsStream<TcpStream>>>),
}

/// A stream the connection loop can split into a reading and a writing side.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {
    /// Whether written bytes can wait below us until `flush`.
    const BUFFERED: bool;
    type Reader<'a>: ReadSide + Send
    where
        Self: 'a;
    type Writer<'a>: WriteSide + Send
    where
        Self: 'a;
    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>);
}

pub(crate) trait ReadSide {
    /// Waits for bytes and appends them to `buf`, first making room for about `want` bytes.
    /// Returns how many were read (0: end of stream) and whether they filled the room (the
    /// peer probably has more). Cancel-safe: bytes are consumed only when it completes.
    fn read_into<'a>(
        &'a mut self,
        buf: &'a mut BytesMut,
        want: usize,
    ) -> impl Future<Output = io::Result<(usize, bool)>> + Send + 'a;
}

pub(crate) trait WriteSide {
    /// Writes some of `buf`. Cancel-safe.
    fn write<'a>(
        &'a mut self,
        buf: &'a [u8],
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a;
    /// Pushes out whatever a lower layer buffered. Cancel-safe.
    fn flush(&mut self) -> impl Future<Output = io::Result<()>> + Send + '_;
}

fn make_room(buf: &mut BytesMut, want: usize) -> usize {
    if buf.capacity() - buf.len() < want / 2 {
        buf.reserve(want);
    }
    buf.capacity() - buf.len()
}

// --- plain TCP: readiness, then a non-blocking read into the buffer ------------------------------

impl Io for TcpStream {
    const BUFFERED: bool = false;
    type Reader<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Writer<'a> = tokio::net::tcp::WriteHalf<'a>;
    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        self.split()
    }
}

impl ReadSide for tokio::net::tcp::ReadHalf<'_> {
    async fn read_into(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<(usize, bool)> {
        loop {
            // Buffer space is taken only once bytes are there: an idle connection holds none.
            self.as_ref().readable().await?;
            let room = make_room(buf, want);
            match self.as_ref().try_read_buf(buf) {
                Ok(n) => return Ok((n, n >= room)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl WriteSide for tokio::net::tcp::WriteHalf<'_> {
    async fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        AsyncWriteExt::write(self, buf).await
    }
    async fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// --- TLS and WebSocket: ordinary async reads and writes through a split -------------------------

macro_rules! split_io {
    ($t:ty) => {
        impl Io for $t {
            const BUFFERED: bool = true;
            type Reader<'a> = tokio::io::ReadHalf<&'a mut $t>;
            type Writer<'a> = tokio::io::WriteHalf<&'a mut $t>;
            fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
                tokio::io::split(self)
            }
        }
    };
}
split_io!(TlsStream<TcpStream>);
split_io!(WsIo<TcpStream>);
split_io!(WsIo<TlsStream<TcpStream>>);

impl<T: AsyncRead + Send> ReadSide for tokio::io::ReadHalf<T> {
    async fn read_into(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<(usize, bool)> {
        let room = make_room(buf, want);
        let n = self.read_buf(buf).await?;
        Ok((n, n >= room))
    }
}

impl<T: AsyncWrite + Send> WriteSide for tokio::io::WriteHalf<T> {
    async fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        AsyncWriteExt::write(self, buf).await
    }
    async fn flush(&mut self) -> io::Result<()> {
        AsyncWriteExt::flush(self).await
    }
}

// --- WebSocket as a byte stream ---------------------------------------------------------------

/// Largest WebSocket frame the broker sends; bigger output is split over several frames (MQTT
/// packets may span frames, [MQTT-6.0.0-2]).
const MAX_FRAME_OUT: usize = 64 * 1024;

/// A WebSocket carrying MQTT in binary messages, read and written as a byte stream. Message
/// boundaries mean nothing: a message may hold several packets or part of one.
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    /// The unread rest of the last binary message.
    pending: Bytes,
}

impl<S> WsIo<S> {
    pub fn new(ws: WebSocketStream<S>) -> WsIo<S> {
        WsIo {
            ws,
            pending: Bytes::new(),
        }
    }
}

fn ws_error(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.pending = data,
                // Pings are answered by tungstenite itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text frame: MQTT over WebSocket uses binary frames [MQTT-6.0.0-1]",
                    )))
                }
                Some(Err(e)) => return Poll::Ready(Err(ws_error(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(ws_error)?;
        let n = buf.len().min(MAX_FRAME_OUT);
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(ws_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(ws_error)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_close(cx)
            .map_err(ws_error)
    }
}
