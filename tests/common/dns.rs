//! A tiny authoritative DNS server for tests (hickory-server with a custom [`RequestHandler`]) on
//! a loopback UDP and TCP port picked by the OS. It answers A and AAAA queries for one name from a
//! list of addresses the test can change at any time, with TTL 0; every other name is `NXDOMAIN`.
//! It can also be made silent (queries are read but never answered) to play an outage.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{
    Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};

/// A running test DNS server; stops when dropped.
pub struct TestDns {
    /// Where it listens (UDP and TCP, same port).
    pub addr: SocketAddr,
    ips: Arc<Mutex<Vec<IpAddr>>>,
    silent: Arc<AtomicBool>,
    queries: Arc<Mutex<u64>>,
    _server: Server<Handler>,
}

impl TestDns {
    /// Serves `name` (a trailing dot is optional) with `ips` on 127.0.0.1.
    pub async fn start(name: &str, ips: Vec<IpAddr>) -> TestDns {
        let (udp, tcp) = bind_pair().await;
        Self::start_on(
            name,
            ips,
            udp.into_std().expect("UDP socket out of tokio"),
            tcp.into_std().expect("TCP listener out of tokio"),
        )
    }

    /// Like [`start`](Self::start), but serves on sockets the caller bound (e.g. inside another
    /// network namespace, or on port 53 of a given address). Must run inside a tokio runtime.
    pub fn start_on(
        name: &str,
        ips: Vec<IpAddr>,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
    ) -> TestDns {
        let mut fqdn = Name::from_utf8(name).expect("valid test DNS name");
        fqdn.set_fqdn(true);
        let ips = Arc::new(Mutex::new(ips));
        let silent = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(Mutex::new(0));
        let handler = Handler {
            name: LowerName::new(&fqdn),
            ips: ips.clone(),
            silent: silent.clone(),
            queries: queries.clone(),
        };
        udp.set_nonblocking(true).expect("non-blocking UDP socket");
        tcp.set_nonblocking(true)
            .expect("non-blocking TCP listener");
        let udp = UdpSocket::from_std(udp).expect("UDP socket into tokio");
        let tcp = TcpListener::from_std(tcp).expect("TCP listener into tokio");
        let addr = udp.local_addr().expect("UDP local address");
        let mut server = Server::new(handler);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 16);
        TestDns {
            addr,
            ips,
            silent,
            queries,
            _server: server,
        }
    }

    /// Replaces the addresses the name resolves to (an empty list: the name has no records).
    pub fn set(&self, ips: Vec<IpAddr>) {
        *self.ips.lock().expect("test DNS lock") = ips;
    }

    /// While `true`, queries are received but never answered (the client times out).
    pub fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::SeqCst);
    }

    /// How many queries arrived so far (answered or not).
    pub fn queries(&self) -> u64 {
        *self.queries.lock().expect("test DNS lock")
    }
}

/// A UDP socket and a TCP listener on the same free loopback port.
async fn bind_pair() -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind UDP");
        let addr = udp.local_addr().expect("UDP local address");
        if let Ok(tcp) = TcpListener::bind(addr).await {
            return (udp, tcp);
        }
    }
    panic!("no loopback port free for both UDP and TCP");
}

struct Handler {
    name: LowerName,
    ips: Arc<Mutex<Vec<IpAddr>>>,
    silent: Arc<AtomicBool>,
    queries: Arc<Mutex<u64>>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        if let Ok(mut n) = self.queries.lock() {
            *n += 1;
        }
        let mut metadata = Metadata::response_from_request(&request.metadata);
        let unanswered = ResponseInfo::from(Header {
            metadata,
            counts: HeaderCounts::default(),
        });
        if self.silent.load(Ordering::SeqCst) {
            return unanswered;
        }
        metadata.authoritative = true;
        let builder = MessageResponseBuilder::from_message_request(request);
        let info = match request.request_info() {
            Ok(info)
                if request.metadata.message_type == MessageType::Query
                    && request.metadata.op_code == OpCode::Query =>
            {
                info
            }
            _ => {
                let response = builder.error_msg(&request.metadata, ResponseCode::FormErr);
                return response_handle
                    .send_response(response)
                    .await
                    .unwrap_or(unanswered);
            }
        };
        let records: Vec<Record> = if *info.query.name() == self.name {
            let qtype = info.query.query_type();
            let ips = self.ips.lock().map(|v| v.clone()).unwrap_or_default();
            ips.into_iter()
                .filter(|ip| match qtype {
                    RecordType::A => ip.is_ipv4(),
                    RecordType::AAAA => ip.is_ipv6(),
                    _ => false,
                })
                .map(|ip| Record::from_rdata(Name::from(&self.name), 0, RData::from(ip)))
                .collect()
        } else {
            metadata.response_code = ResponseCode::NXDomain;
            Vec::new()
        };
        let response = builder.build(metadata, records.iter(), [], [], []);
        response_handle
            .send_response(response)
            .await
            .unwrap_or(unanswered)
    }
}
