//! The gRPC port's per-connection service: a call's deadline from its HEADERS frame,
//! its body wrapped in the edge's limits, then tonic's routes.

use super::*;

/// What every gRPC call on every connection shares.
#[derive(Clone)]
pub struct GrpcEdge {
    pub budget: Budget,
    pub body_timeout: Duration,
    pub max_message_bytes: usize,
    pub deadlines: DeadlinePolicy,
    /// Judges ModelInfer calls from their first bytes ([`super::early`]); `None`: every
    /// call takes the full path.
    pub early: Option<EarlyRefusal>,
}

impl GrpcEdge {
    pub fn new(limits: &EdgeLimits, max_message_bytes: usize, deadlines: DeadlinePolicy) -> Self {
        GrpcEdge {
            budget: Budget::new(limits.max_request_bytes_in_flight, max_message_bytes),
            body_timeout: limits.body_read_timeout,
            max_message_bytes,
            deadlines,
            early: None,
        }
    }

    /// A call's `grpc-timeout` and its deadline. Unary inference calls get the server's
    /// deadline policy (its default and maximum); other calls, ModelStreamInfer included
    /// (the policy bounds each request on a stream, not the stream), only the deadline
    /// they ask for.
    fn deadline<B>(
        &self,
        req: &hyper::Request<B>,
        rules: BodyRules,
        start: Instant,
    ) -> (Option<Duration>, Option<Instant>) {
        let header_timeout = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::api::grpc::parse_grpc_timeout);
        let deadline = if rules.free_below == 0 && !rules.streaming {
            self.deadlines.deadline(start, header_timeout, None)
        } else {
            header_timeout.map(|t| start + t)
        };
        (header_timeout, deadline)
    }

    /// Refuse ModelInfer calls their model's limit refuses before reading their bodies.
    pub fn with_early_refusal(self, early: EarlyRefusal) -> Self {
        GrpcEdge {
            early: Some(early),
            ..self
        }
    }
}

/// The edge in front of one connection's gRPC routes.
#[derive(Clone)]
pub struct GrpcEdgeService<S> {
    pub inner: S,
    pub edge: GrpcEdge,
    pub activity: Arc<Activity>,
}

pub(super) type ResponseFuture<B> = Pin<
    Box<
        dyn Future<Output = Result<hyper::Response<TrackedBody<B>>, std::convert::Infallible>>
            + Send,
    >,
>;

impl<S, B> tower::Service<hyper::Request<Incoming>> for GrpcEdgeService<S>
where
    S: tower::Service<
            hyper::Request<LimitedBody>,
            Response = hyper::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Default + Unpin + Send + 'static,
{
    type Response = hyper::Response<TrackedBody<B>>;
    type Error = std::convert::Infallible;
    type Future = ResponseFuture<B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: hyper::Request<Incoming>) -> Self::Future {
        let start = Instant::now();
        let call = self.activity.start();
        let rules = rules_for(req.uri().path(), self.edge.max_message_bytes);
        let (header_timeout, deadline) = self.edge.deadline(&req, rules, start);
        req.extensions_mut().insert(RequestStart(start));
        let reservation = Arc::new(Reservation::default());
        let decode_budget: Arc<dyn DecodeBudget> = Arc::new(CallBudget {
            budget: self.edge.budget.clone(),
            reservation: reservation.clone(),
        });
        req.extensions_mut()
            .insert(CallDecodeBudget(decode_budget.clone()));
        let req = req.map(|body| {
            LimitedBody::new(
                body,
                rules,
                &self.edge,
                reservation.clone(),
                start,
                deadline,
            )
        });
        let infer = rules.free_below == 0 && !rules.streaming;
        let early = self.edge.early.clone().filter(|_| infer);
        // The service polled ready is the one called; a fresh clone stays behind.
        let inner = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, inner);
        let policy = self.edge.deadlines;
        Box::pin(DECODE_BUDGET.scope(decode_budget, async move {
            let (parts, mut body) = req.into_parts();
            if let Some(early) = early {
                let refusal = early.refuse(&mut body, &policy, start, header_timeout);
                if let Some(status) = refusal.await {
                    drop(body);
                    drop(reservation);
                    metrics::refusal_duration("edge", start.elapsed());
                    let response = status.into_http::<B>();
                    return Ok(response.map(|inner| TrackedBody { inner, _call: call }));
                }
            }
            let response = inner.call(hyper::Request::from_parts(parts, body)).await?;
            // A unary call's message bytes stay reserved until here: its decoded
            // tensors lived until the answer was ready.
            drop(reservation);
            if infer
                && response
                    .headers()
                    .get("grpc-status")
                    .is_some_and(|s| s == UNAVAILABLE)
            {
                metrics::refusal_duration("admission", start.elapsed());
            }
            Ok(response.map(|inner| TrackedBody { inner, _call: call }))
        }))
    }
}
