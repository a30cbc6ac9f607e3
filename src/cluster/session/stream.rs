//! The handshake over a stream: [`connect`] (the side that dialed) and [`accept`].

use tokio::io::{AsyncRead, AsyncWrite};

use super::super::secret::ClusterSecret;
use super::super::wire::{
    read_frame, write_frame, Envelope, Message, RejectReason, WireError, MAX_FRAME,
};
use super::handshake::{client_on_welcome, client_start, server_on_confirm, server_on_hello};
use super::{clip, received, reject, HandshakeError, Identity, Session, ECHO_MAX};

async fn send_plain<S: AsyncWrite + Unpin>(
    stream: &mut S,
    cluster: &str,
    body: Message,
) -> Result<(), WireError> {
    write_frame(stream, &Envelope::new(cluster, body).encode()?).await
}

async fn recv_plain<S: AsyncRead + Unpin>(
    stream: &mut S,
    cluster: &str,
) -> Result<Envelope, WireError> {
    Envelope::decode(&read_frame(stream, MAX_FRAME).await?, cluster)
}

/// Sends this node's refusal, if the error calls for one, and returns the error.
async fn refuse<S: AsyncWrite + Unpin>(
    stream: &mut S,
    cluster: &str,
    err: HandshakeError,
) -> HandshakeError {
    if let Some(r) = err.reject_to_send() {
        // Best effort: the peer may already be gone, and the error to report is `err`.
        let _ = send_plain(stream, cluster, Message::Reject(r)).await;
    }
    err
}

/// Runs the client side of the handshake on `stream` (a connection this node opened).
///
/// On failure, sends the peer a Reject when this node is the one refusing. No timeout is
/// applied: wrap the call in `tokio::time::timeout`.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    identity: &Identity,
    secret: Option<&ClusterSecret>,
) -> Result<Session, HandshakeError> {
    match connect_steps(stream, identity, secret).await {
        Ok(s) => Ok(s),
        Err(e) => Err(refuse(stream, &identity.cluster, e).await),
    }
}

async fn connect_steps<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    identity: &Identity,
    secret: Option<&ClusterSecret>,
) -> Result<Session, HandshakeError> {
    let cluster = &identity.cluster;
    let (hello, pending) = client_start(identity, secret)?;
    send_plain(stream, cluster, Message::Hello(hello)).await?;
    let welcome = match recv_plain(stream, cluster).await?.body {
        Message::Welcome(w) => w,
        Message::Reject(r) => return Err(received(r)),
        other => {
            return Err(HandshakeError::Unexpected {
                expected: "welcome",
                got: other.kind(),
            })
        }
    };
    let (confirm, session) = client_on_welcome(pending, &welcome)?;
    if let Some(frame) = confirm {
        write_frame(stream, &frame).await?;
    }
    Ok(session)
}

/// Runs the server side of the handshake on `stream` (a connection this node accepted).
///
/// Without a secret the server does not wait for a third message, so a client that refuses the
/// server's Welcome is seen as a [`Message::Reject`] on the session.
/// No timeout is applied: wrap the call in `tokio::time::timeout`.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    identity: &Identity,
    secret: Option<&ClusterSecret>,
) -> Result<Session, HandshakeError> {
    match accept_steps(stream, identity, secret).await {
        Ok(s) => Ok(s),
        Err(e) => Err(refuse(stream, &identity.cluster, e).await),
    }
}

async fn accept_steps<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    identity: &Identity,
    secret: Option<&ClusterSecret>,
) -> Result<Session, HandshakeError> {
    let cluster = &identity.cluster;
    let env = recv_plain(stream, cluster).await?;
    let hello = match env.body {
        Message::Hello(h) => h,
        Message::Reject(r) => return Err(received(r)),
        other => {
            return Err(HandshakeError::Unexpected {
                expected: "hello",
                got: other.kind(),
            })
        }
    };
    if env.cluster != hello.cluster {
        return Err(HandshakeError::Refused(reject(
            RejectReason::Protocol,
            format!(
                "the envelope names cluster {:?} but the hello names {:?}",
                clip(&env.cluster, ECHO_MAX),
                clip(&hello.cluster, ECHO_MAX)
            ),
        )));
    }
    let (welcome, pending) =
        server_on_hello(identity, secret, &hello).map_err(HandshakeError::Refused)?;
    send_plain(stream, cluster, Message::Welcome(welcome)).await?;
    if pending.expects_confirm() {
        let frame = read_frame(stream, MAX_FRAME).await?;
        server_on_confirm(pending, Some(&frame))
    } else {
        server_on_confirm(pending, None)
    }
}
