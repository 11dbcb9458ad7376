package enforcer

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/internal/redact"
	"github.com/meterd/meterd/schemas"
)

// Types of Notification.
const (
	NotifyUsageThreshold = "usage.threshold"
	NotifyBillingUnpaid  = "billing.unpaid"
	NotifyAccessRestored = "access.restored"
)

// Notification tells a tenant's operator that usage reached 80 % or 100 % of
// a limit (once per tenant, meter, period and threshold), that the tenant was
// blocked for billing, or that a block was lifted. It is published on
// schemas.NotifySubject(tenant) and POSTed, signed with Meterd-Signature (see
// VerifySignature), to every Config.NotifyURLs. ID is stable: a receiver
// drops a notification whose ID it has seen.
type Notification struct {
	Type   string `json:"type"`
	ID     string `json:"id"`
	Tenant string `json:"tenant"`
	// Reason is the block's (billing.unpaid) or the lifted block's
	// (access.restored) reason.
	Reason      schemas.Reason `json:"reason,omitempty"`
	Meter       string         `json:"meter,omitempty"`
	Threshold   int            `json:"threshold,omitempty"` // percent of Limit
	Used        int64          `json:"used,omitempty"`
	Limit       int64          `json:"limit,omitempty"`
	PeriodStart time.Time      `json:"period_start,omitzero"`
	PeriodEnd   time.Time      `json:"period_end,omitzero"`
	At          time.Time      `json:"at"`
}

// thresholdID is the id of a threshold notification, and the key of its
// marker in NotifyBucket.
func thresholdID(tenant, meter string, periodStart time.Time, pct int) string {
	return "usage." + tenant + "." + meter + "." + strconv.FormatInt(periodStart.Unix(), 10) + "." + strconv.Itoa(pct)
}

// eventID is the id of a billing.unpaid or access.restored notification:
// the version of the block it is about.
func eventID(kind, tenant string, version uint64) string {
	return kind + "." + tenant + "." + strconv.FormatUint(version, 10)
}

// notifyWorkers deliver notifications concurrently, so one slow URL holds up
// only the notification being retried.
const notifyWorkers = 4

// notifier delivers notifications from a queue in the background: queuing
// never blocks a decision. Before delivering one it creates the marker of
// its id in NotifyBucket, and skips the notification when the marker exists:
// a notification is sent once, also across restarts and replicas. A delivery
// cut short by shutdown removes its marker, so the threshold is sent after
// the restart (at least once, with the same id).
type notifier struct {
	nc     *nats.Conn
	urls   []string
	secret string
	client *http.Client
	log    *slog.Logger
	m      *metrics
	// newBackOff paces the retries of one delivery; bounded.
	newBackOff func() backoff.BackOff
	// active reports whether this replica may claim notifications (it is
	// the active one); a claimed notification is delivered to its end.
	active func() bool

	mu    sync.Mutex
	queue []Notification
	wake  chan struct{}
}

func newNotifier(nc *nats.Conn, urls []string, secret string, log *slog.Logger, m *metrics) *notifier {
	return &notifier{
		nc: nc, urls: urls, secret: secret, log: log, m: m,
		client: &http.Client{Timeout: 10 * time.Second},
		newBackOff: func() backoff.BackOff {
			return backoff.NewExponentialBackOff(
				backoff.WithInitialInterval(500*time.Millisecond),
				backoff.WithMaxInterval(30*time.Second),
				backoff.WithMaxElapsedTime(10*time.Minute),
			)
		},
		wake: make(chan struct{}, 1),
	}
}

// enqueue adds x to the queue; it never blocks.
func (n *notifier) enqueue(x Notification) {
	n.mu.Lock()
	n.queue = append(n.queue, x)
	n.mu.Unlock()
	signal(n.wake)
}

// drop empties the queue: this replica stood down, and the next active one
// queues every threshold reached again.
func (n *notifier) drop() {
	n.mu.Lock()
	n.queue = nil
	n.mu.Unlock()
}

func (n *notifier) pop() (Notification, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(n.queue) == 0 {
		return Notification{}, false
	}
	x := n.queue[0]
	n.queue[0] = Notification{}
	n.queue = n.queue[1:]
	if len(n.queue) > 0 {
		signal(n.wake) // another worker may take the next one
	}
	return x, true
}

// run delivers until ctx ends; what is still queued then is dropped (a
// threshold is found again after a restart).
func (n *notifier) run(ctx context.Context, kv jetstream.KeyValue) {
	var wg sync.WaitGroup
	for range notifyWorkers {
		wg.Go(func() {
			for {
				if x, ok := n.pop(); ok {
					n.deliver(ctx, kv, x)
					continue
				}
				select {
				case <-ctx.Done():
					return
				case <-n.wake:
				}
			}
		})
	}
	wg.Wait()
}

// deliver claims x's marker, publishes x and POSTs it to every URL.
func (n *notifier) deliver(ctx context.Context, kv jetstream.KeyValue, x Notification) {
	if ctx.Err() != nil {
		return
	}
	body, err := json.Marshal(x)
	if err != nil {
		return
	}
	claimed := false
	err = backoff.Retry(func() error {
		if n.active != nil && !n.active() {
			return backoff.Permanent(ErrNotActive)
		}
		_, err := kv.Create(ctx, x.ID, body)
		switch {
		case err == nil:
			claimed = true
			return nil
		case errors.Is(err, jetstream.ErrKeyExists):
			return nil // sent before
		case errors.Is(err, jetstream.ErrInvalidKey):
			return backoff.Permanent(err)
		}
		return err
	}, backoff.WithContext(n.newBackOff(), ctx))
	if errors.Is(err, ErrNotActive) {
		return // the active replica sends it
	}
	if err != nil {
		if ctx.Err() == nil {
			n.m.notifyFailed.WithLabelValues(x.Type).Inc()
			n.log.Error("notification dropped: its marker cannot be written", "id", x.ID, "err", err)
		}
		return
	}
	if !claimed {
		return
	}
	// Core NATS, at most once: subscribers that need every notification
	// take the URLs.
	if err := n.nc.Publish(schemas.NotifySubject(x.Tenant), body); err != nil {
		n.log.Warn("notification publish failed", "id", x.ID, "err", err)
	} else {
		n.m.notifySent.WithLabelValues(x.Type).Inc()
	}
	for _, u := range n.urls {
		err := backoff.Retry(func() error { return n.post(ctx, u, body) }, backoff.WithContext(n.newBackOff(), ctx))
		switch {
		case err == nil:
			n.m.notifySent.WithLabelValues(x.Type).Inc()
		case ctx.Err() != nil:
			// Shutting down: forget the marker, so the restart sends it.
			dctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			kv.Delete(dctx, x.ID)
			cancel()
			return
		default:
			n.m.notifyFailed.WithLabelValues(x.Type).Inc()
			n.log.Error("notification not delivered; giving up", "id", x.ID, "type", x.Type, "tenant", x.Tenant, "url", redact.Origin(u), "err", err)
		}
	}
}

// post sends body to u once. A 4xx other than 408, 425 and 429 is permanent.
func (n *notifier) post(ctx context.Context, u string, body []byte) error {
	// A notification URL may hold a token (chat webhooks): errors name
	// only its origin.
	origin := redact.Origin(u)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		return backoff.Permanent(fmt.Errorf("POST %s: bad URL", origin))
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "meterd-enforcer")
	if n.secret != "" {
		// The receiver checks the timestamp against its own clock: sign
		// with the wall clock, never a test's.
		req.Header.Set(SignatureHeader, Sign(body, n.secret, time.Now()))
	}
	resp, err := n.client.Do(req)
	if err != nil {
		var uerr *url.Error
		if errors.As(err, &uerr) {
			err = uerr.Err
		}
		return fmt.Errorf("POST %s: %w", origin, err)
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	switch c := resp.StatusCode; {
	case c >= 200 && c < 300:
		return nil
	case c >= 400 && c < 500 && c != http.StatusRequestTimeout && c != http.StatusTooEarly && c != http.StatusTooManyRequests:
		return backoff.Permanent(fmt.Errorf("POST %s: %s", origin, resp.Status))
	default:
		return fmt.Errorf("POST %s: %s", origin, resp.Status)
	}
}

// thresholdUnits is the usage at which pct percent of limit is reached:
// ceil(limit·pct/100), exact for every int64 limit (pct is 80 or 100).
func thresholdUnits(limit int64, pct int) int64 {
	if pct == 100 {
		return limit
	}
	return limit - limit/5 // ceil(0.8·limit)
}

// thresholds queues the usage.threshold notifications, once per tenant,
// meter, period and threshold while the enforcer runs (the marker in
// NotifyBucket makes it once across restarts and replicas). It belongs to
// the tracker and is used under the tracker's lock.
type thresholds struct {
	// active: queue notifications (this replica is the active one); a
	// standby tracks usage but queues nothing.
	active   bool
	notify   *notifier
	now      func() time.Time
	notified map[string]map[string]bool // tenant → ids queued this period
}

// notifyThresholds are the percentages of a limit that are notified.
var notifyThresholds = []int{WarnPercent, 100}

// checkAll queues the notifications of every limit of tenant its usage u
// reached.
func (th *thresholds) checkAll(cat *catalog.Catalog, tenant string, u *tenantUsage) {
	for meter, limit := range cat.Limits(tenant) {
		th.check(tenant, u, meter, limit)
	}
}

// check queues a notification for each threshold of meter's limit the
// usage reached and that was not queued this period. A limit of 0 has no
// thresholds worth telling.
func (th *thresholds) check(tenant string, u *tenantUsage, meter string, limit int64) {
	if !th.active || !u.seeded || limit <= 0 {
		return
	}
	used := u.used[meter]
	for _, pct := range notifyThresholds {
		if used < thresholdUnits(limit, pct) {
			return
		}
		id := thresholdID(tenant, meter, u.period.Start, pct)
		if th.notified[tenant][id] {
			continue
		}
		if th.notified[tenant] == nil {
			th.notified[tenant] = map[string]bool{}
		}
		th.notified[tenant][id] = true
		th.notify.enqueue(Notification{
			Type: NotifyUsageThreshold, ID: id, Tenant: tenant, Meter: meter, Threshold: pct,
			Used: used, Limit: limit, PeriodStart: u.period.Start, PeriodEnd: u.period.End, At: th.now(),
		})
	}
}

// forget drops what was queued for tenant: its period changed, or it left
// the catalog.
func (th *thresholds) forget(tenant string) { delete(th.notified, tenant) }
