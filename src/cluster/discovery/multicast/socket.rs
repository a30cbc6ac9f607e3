//! The UDP sockets: the receiving one joined to the group, the sending one bound to this node's
//! address, and the errors setting them up or using them.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use super::MULTICAST_TTL;

/// Why the multicast sockets could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub(super) enum SocketError {
    #[error("{0} is not an IPv4 multicast address")]
    NotMulticast(Ipv4Addr),
    #[error("cannot create a UDP socket: {0}")]
    Create(#[source] io::Error),
    #[error("cannot set {option}: {source}")]
    Option {
        option: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("cannot join the group: {0}")]
    Join(#[source] io::Error),
    #[error("cannot send an announcement: {0}")]
    Send(#[source] io::Error),
    #[error("cannot receive announcements: {0}")]
    Receive(#[source] io::Error),
}

pub(super) struct Sockets {
    recv: UdpSocket,
    pub(super) send: UdpSocket,
}

fn udp_socket() -> Result<Socket, SocketError> {
    Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(SocketError::Create)
}

fn opt(option: &'static str, r: io::Result<()>) -> Result<(), SocketError> {
    r.map_err(|source| SocketError::Option { option, source })
}

fn bind(socket: &Socket, addr: SocketAddrV4) -> Result<(), SocketError> {
    socket
        .bind(&addr.into())
        .map_err(|source| SocketError::Bind { addr, source })
}

fn into_tokio(socket: Socket) -> Result<UdpSocket, SocketError> {
    opt("O_NONBLOCK", socket.set_nonblocking(true))?;
    UdpSocket::from_std(socket.into()).map_err(|source| SocketError::Option {
        option: "the tokio registration",
        source,
    })
}

/// Opens the receiving socket (joined to the group on `iface`) and the sending socket.
pub(super) fn open(
    group: SocketAddrV4,
    iface: Ipv4Addr,
    source: Ipv4Addr,
) -> Result<Sockets, SocketError> {
    if !group.ip().is_multicast() {
        return Err(SocketError::NotMulticast(*group.ip()));
    }

    let recv = udp_socket()?;
    opt("SO_REUSEADDR", recv.set_reuse_address(true))?;
    #[cfg(unix)]
    opt("SO_REUSEPORT", recv.set_reuse_port(true))?;
    if let Err(e) = bind(&recv, group) {
        let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, group.port());
        tracing::debug!(error = %e, "binding the group address failed; binding {any} instead");
        bind(&recv, any)?;
        // Only the groups this socket joined, not every group joined on the host.
        #[cfg(target_os = "linux")]
        opt("IP_MULTICAST_ALL", recv.set_multicast_all_v4(false))?;
    }
    recv.join_multicast_v4(group.ip(), &iface)
        .map_err(SocketError::Join)?;

    let send = udp_socket()?;
    bind(&send, SocketAddrV4::new(source, 0))?;
    opt("IP_MULTICAST_IF", send.set_multicast_if_v4(&iface))?;
    opt("IP_MULTICAST_LOOP", send.set_multicast_loop_v4(true))?;
    opt("IP_MULTICAST_TTL", send.set_multicast_ttl_v4(MULTICAST_TTL))?;

    Ok(Sockets {
        recv: into_tokio(recv)?,
        send: into_tokio(send)?,
    })
}

pub(super) async fn recv_from(
    sockets: Option<&Sockets>,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr)> {
    match sockets {
        Some(s) => s.recv.recv_from(buf).await,
        None => std::future::pending().await,
    }
}
