//! The UDP sockets: the receiving one joined to the group, the sending one bound to this node's
//! address, and the errors setting them up or using them.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use super::{Interface, MULTICAST_TTL};

/// Why the multicast sockets could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub(super) enum SocketError {
    #[error("{0} is not a multicast address")]
    NotMulticast(IpAddr),
    #[error("group {group} and interface {iface} are of different IP families")]
    Family { group: SocketAddr, iface: Interface },
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
        addr: SocketAddr,
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

fn udp_socket(domain: Domain) -> Result<Socket, SocketError> {
    Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)).map_err(SocketError::Create)
}

fn opt(option: &'static str, r: io::Result<()>) -> Result<(), SocketError> {
    r.map_err(|source| SocketError::Option { option, source })
}

fn bind(socket: &Socket, addr: SocketAddr) -> Result<(), SocketError> {
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

/// Opens the receiving socket (joined to `group` on `iface`) and the sending socket (bound to
/// `source`), for an IPv4 or an IPv6 group.
pub(super) fn open(
    group: SocketAddr,
    iface: Interface,
    source: IpAddr,
) -> Result<Sockets, SocketError> {
    if !group.ip().is_multicast() {
        return Err(SocketError::NotMulticast(group.ip()));
    }
    match (group, iface, source) {
        (SocketAddr::V4(g), Interface::V4(i), IpAddr::V4(s)) => open_v4(g, i, s),
        (SocketAddr::V6(g), Interface::V6(i), IpAddr::V6(s)) => open_v6(g, i, s),
        _ => Err(SocketError::Family { group, iface }),
    }
}

fn open_v4(group: SocketAddrV4, iface: Ipv4Addr, source: Ipv4Addr) -> Result<Sockets, SocketError> {
    let recv = udp_socket(Domain::IPV4)?;
    opt("SO_REUSEADDR", recv.set_reuse_address(true))?;
    #[cfg(unix)]
    opt("SO_REUSEPORT", recv.set_reuse_port(true))?;
    if let Err(e) = bind(&recv, group.into()) {
        let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, group.port());
        tracing::debug!(error = %e, "binding the group address failed; binding {any} instead");
        bind(&recv, any.into())?;
        // Only the groups this socket joined, not every group joined on the host.
        #[cfg(target_os = "linux")]
        opt("IP_MULTICAST_ALL", recv.set_multicast_all_v4(false))?;
    }
    recv.join_multicast_v4(group.ip(), &iface)
        .map_err(SocketError::Join)?;

    let send = udp_socket(Domain::IPV4)?;
    bind(&send, SocketAddrV4::new(source, 0).into())?;
    opt("IP_MULTICAST_IF", send.set_multicast_if_v4(&iface))?;
    opt("IP_MULTICAST_LOOP", send.set_multicast_loop_v4(true))?;
    opt("IP_MULTICAST_TTL", send.set_multicast_ttl_v4(MULTICAST_TTL))?;

    Ok(Sockets {
        recv: into_tokio(recv)?,
        send: into_tokio(send)?,
    })
}

/// The IPv6 counterpart of [`open_v4`]: the interface is an index (0 = by route). Both sockets are
/// IPv6-only, so an IPv4 datagram never arrives on them.
fn open_v6(group: SocketAddrV6, iface: u32, source: Ipv6Addr) -> Result<Sockets, SocketError> {
    let recv = udp_socket(Domain::IPV6)?;
    opt("IPV6_V6ONLY", recv.set_only_v6(true))?;
    opt("SO_REUSEADDR", recv.set_reuse_address(true))?;
    #[cfg(unix)]
    opt("SO_REUSEPORT", recv.set_reuse_port(true))?;
    // A link-local group (ff02::/16) is only meaningful with its interface as the zone.
    let group_bind = SocketAddrV6::new(*group.ip(), group.port(), 0, zone(group.ip(), iface));
    if let Err(e) = bind(&recv, group_bind.into()) {
        let any = SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, group.port(), 0, 0);
        tracing::debug!(error = %e, "binding the group address failed; binding {any} instead");
        bind(&recv, any.into())?;
        #[cfg(target_os = "linux")]
        opt("IPV6_MULTICAST_ALL", recv.set_multicast_all_v6(false))?;
    }
    recv.join_multicast_v6(group.ip(), iface)
        .map_err(SocketError::Join)?;

    let send = udp_socket(Domain::IPV6)?;
    opt("IPV6_V6ONLY", send.set_only_v6(true))?;
    // An fe80:: source needs its interface as the zone to be bound at all.
    let source_zone = if source.is_unicast_link_local() {
        iface
    } else {
        0
    };
    bind(&send, SocketAddrV6::new(source, 0, 0, source_zone).into())?;
    opt("IPV6_MULTICAST_IF", send.set_multicast_if_v6(iface))?;
    opt("IPV6_MULTICAST_LOOP", send.set_multicast_loop_v6(true))?;
    opt(
        "IPV6_MULTICAST_HOPS",
        send.set_multicast_hops_v6(MULTICAST_TTL),
    )?;

    Ok(Sockets {
        recv: into_tokio(recv)?,
        send: into_tokio(send)?,
    })
}

/// The zone (scope id) of a group: the interface for an interface- or link-local group
/// (`ffx1::`, `ffx2::`), none for wider scopes.
fn zone(group: &Ipv6Addr, iface: u32) -> u32 {
    let scope = group.octets()[1] & 0x0f;
    if scope <= 2 {
        iface
    } else {
        0
    }
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
