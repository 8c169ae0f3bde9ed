//! PROXY protocol v1 (text) and v2 (binary) headers, as load balancers put them in front of a
//! TCP stream to name the original client.
//!
//! The header is read byte-exactly — nothing after it is consumed — so the stream can go on to
//! TLS or MQTT unchanged. Its size is bounded (v1: 107 bytes by the spec; v2: [`V2_MAX_BODY`]) and
//! the caller bounds the time. Parsing is done by the `ppp` crate.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12-byte signature that opens a v2 header.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The shortest v1 header, `PROXY UNKNOWN\r\n`; also less than a v2 header's fixed part, so
/// reading this much first never reads past a header.
const MIN_HEADER: usize = 15;
/// The longest v1 header, CRLF included (spec §2.1).
const V1_MAX: usize = 107;
/// Bound on a v2 header's address and TLV part. Real balancers send well under this (AWS NLB
/// and HAProxy: a few hundred bytes); the format allows 65535.
pub const V2_MAX_BODY: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    #[error("the connection does not start with a PROXY protocol header")]
    Missing,
    #[error("malformed PROXY v1 header: {0}")]
    V1(String),
    #[error("malformed PROXY v2 header: {0}")]
    V2(String),
    #[error("PROXY v2 header body of {0} bytes exceeds the {V2_MAX_BODY}-byte bound")]
    TooLarge(usize),
}

/// Reads one PROXY header from the start of `stream`. Returns the client's address, or `None`
/// when the header carries none (v2 LOCAL, as used by balancer health checks; v1 UNKNOWN; v2
/// UNIX or unspecified family): the socket peer then stands.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut head = [0u8; 16];
    stream.read_exact(&mut head[..MIN_HEADER]).await?;
    if head[..12] == V2_SIGNATURE {
        stream.read_exact(&mut head[MIN_HEADER..]).await?;
        let body = usize::from(u16::from_be_bytes([head[14], head[15]]));
        if body > V2_MAX_BODY {
            return Err(ProxyHeaderError::TooLarge(body));
        }
        let mut header = Vec::with_capacity(16 + body);
        header.extend_from_slice(&head);
        header.resize(16 + body, 0);
        stream.read_exact(&mut header[16..]).await?;
        return parse_v2(&header);
    }
    if !head.starts_with(b"PROXY ") {
        return Err(ProxyHeaderError::Missing);
    }
    let mut line = head[..MIN_HEADER].to_vec();
    // Byte by byte, so that nothing past the CRLF is consumed; at most 92 reads, once per
    // connection, and only on listeners behind a balancer.
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(ProxyHeaderError::V1(format!(
                "no CRLF within {V1_MAX} bytes"
            )));
        }
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        line.push(byte[0]);
    }
    parse_v1(&line)
}

fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    use ppp::v1::{Addresses, Header};
    let text = std::str::from_utf8(line).map_err(|e| ProxyHeaderError::V1(e.to_string()))?;
    let header = Header::try_from(text).map_err(|e| ProxyHeaderError::V1(e.to_string()))?;
    Ok(match header.addresses {
        Addresses::Tcp4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        Addresses::Tcp6(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        Addresses::Unknown => None,
    })
}

fn parse_v2(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    use ppp::v2::{Addresses, Command, Header};
    let header = Header::try_from(bytes).map_err(|e| ProxyHeaderError::V2(e.to_string()))?;
    if header.command == Command::Local {
        return Ok(None);
    }
    Ok(match header.addresses {
        Addresses::IPv4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        Addresses::IPv6(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        Addresses::Unix(_) | Addresses::Unspecified => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let mut cursor = std::io::Cursor::new(bytes.to_vec());
        let result = read_header(&mut cursor).await;
        let pos = cursor.position() as usize;
        (result, bytes[pos..].to_vec())
    }

    #[tokio::test]
    async fn v1_tcp4_and_tcp6_leave_the_rest_unread() {
        let (r, rest) = read(b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 1883\r\n\x10\x00").await;
        assert_eq!(r.unwrap(), Some("192.0.2.7:51000".parse().unwrap()));
        assert_eq!(rest, b"\x10\x00");
        let (r, _) = read(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 1883\r\n").await;
        assert_eq!(r.unwrap(), Some("[2001:db8::1]:4000".parse().unwrap()));
        let (r, rest) = read(b"PROXY UNKNOWN\r\nabc").await;
        assert_eq!(r.unwrap(), None);
        assert_eq!(rest, b"abc");
    }

    #[tokio::test]
    async fn v2_proxy_and_local() {
        use ppp::v2::{Builder, Command, Protocol, Version};
        let addrs: (SocketAddr, SocketAddr) = (
            "203.0.113.9:40000".parse().unwrap(),
            "10.0.0.1:1883".parse().unwrap(),
        );
        let mut bytes =
            Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, addrs)
                .write_tlv(0x04, b"tlv-noop")
                .unwrap()
                .build()
                .unwrap();
        bytes.extend_from_slice(b"after");
        let (r, rest) = read(&bytes).await;
        assert_eq!(r.unwrap(), Some(addrs.0));
        assert_eq!(rest, b"after");

        let local = Builder::with_addresses(
            Version::Two | Command::Local,
            Protocol::Stream,
            ppp::v2::Addresses::Unspecified,
        )
        .build()
        .unwrap();
        assert_eq!(read(&local).await.0.unwrap(), None);
    }

    #[tokio::test]
    async fn garbage_missing_and_oversized_are_refused() {
        assert!(matches!(
            read(b"\x10\x11\x00\x04MQTT\x04\x02\x00\x3c\x00\x05dev-1")
                .await
                .0,
            Err(ProxyHeaderError::Missing)
        ));
        assert!(matches!(
            read(b"PROXY TCP4 not-an-ip 198.51.100.1 1 2\r\n").await.0,
            Err(ProxyHeaderError::V1(_))
        ));
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert!(matches!(read(&long).await.0, Err(ProxyHeaderError::V1(_))));
        let mut big = V2_SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(
            read(&big).await.0,
            Err(ProxyHeaderError::TooLarge(65535))
        ));
        // Truncated: the stream ends inside the header.
        assert!(matches!(
            read(b"PROXY TCP4 1.2.3.4").await.0,
            Err(ProxyHeaderError::Io(_))
        ));
    }
}
