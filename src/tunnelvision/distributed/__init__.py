"""Ray Serve mode (`tunnelvision serve --ray`): the same application, its models on a Ray cluster.

Shape. This process stays the HTTP ingress: the usual app (auth, parsing, jobs, metrics,
playground) and the usual Engine, whose backends are `remote.RemoteBackend`s. Each pipeline set's
device work is the Serve deployment `remote.DeviceReplica`: one copy of the models per replica,
one GPU each where the cluster has GPUs (`ray_num_gpus`; fractional or 0 for CPU), between
`ray_min_replicas` and `ray_max_replicas`, autoscaled on requests in flight per replica.

Why the scheduler stays at the ingress, in front of the hop, rather than a whole Engine per
replica with a forwarding ingress:
- Admission is one bounded queue for the whole cluster, decided at submit time: a full queue is
  our 503 with Retry-After at once. Serve's own queue is per caller; it holds at most one call
  per ingress device worker, and its BackPressureError, were it bounded, is the same 503.
- Deadlines are checked before the hop (the scheduler drops late tasks) and again on the replica
  before its device pass: what is left of each request's deadline crosses the hop with it.
- A client that hangs up before its batch is sent never reaches a replica (the scheduler drops
  the queued task); once sent, the engine tells the backend (`RemoteBackend.abandon`), and a call
  whose every client has gone is cancelled: the replica skips what has not reached its device.
- Jobs, the image_id cache, /metrics and /readyz are the ingress's, unchanged: an image_id stays
  valid whichever replica serves it, and jobs live in the ingress node's SQLite, their runner
  submitting through the same engine and so the same remote backends.
- The engine gets `ray_max_replicas x IN_FLIGHT_PER_REPLICA` device workers, so every replica
  holds a batch on its device and the next one being prepared; the replica does prepare, the
  device pass and finish (mask encoding included), so CPU work scales with replicas too.
- A replica that dies mid-call is retried once (Ray routes to a live or restarted one; the work
  is pure), then answered 503; a call is bounded by its deadline, so nothing hangs.

Ray is imported only here (`remote`, `cluster`); `work` (what crosses the hop, and the replica's
loop) has no Ray, so the engine and models stay free of it and `work` is tested anywhere.

A replica warms its models up in its constructor, so Serve sends it nothing before it is warm
(the first replicas are deployed during the server's loading phase: ready means every replica is
warm). Each reply carries the replica's numbers (counters, embedding cache), which the ingress
keeps per replica for /readyz and adds up for /metrics without ever asking a replica on its own.
A request reusing an image_id is routed by Serve (multiplexed model ids) to the replica that
announced it holds its embedding. Readiness counts live replicas (`/readyz`, `doctor`).

Limits: a device pass already running is not interrupted (a blocking model call cannot be); a
replica's numbers are as of its last reply.
"""
