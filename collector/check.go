package collector

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"unicode/utf8"

	"github.com/nats-io/nuid"

	"github.com/meterd/meterd/gate"
	"github.com/meterd/meterd/schemas"
)

// Defaults of the forward-auth check (docs/architecture.md#http-apis).
const (
	DefaultTenantHeader = "X-Tenant-ID"
	DefaultMeterHeader  = "X-Meter"
	DefaultValueHeader  = "X-Meter-Value"
	DefaultMeter        = "api_calls"
)

// Gate is what /v1/check asks: the in-memory blocklist. *gate.Gate is one.
type Gate interface {
	Check(tenant string) gate.Verdict
}

var _ Gate = (*gate.Gate)(nil)

// handleCheck is the forward-auth endpoint of Envoy ext_authz (HTTP),
// Traefik ForwardAuth, Caddy forward_auth and nginx auth_request: any method,
// any path under /v1/check. It answers from the gate in memory — never
// waiting on NATS, the enforcer or the store — 200 when the call may pass
// (and records it as a usage event), or the block's 402 problem. It is the
// one decision of both transports: Envoy's gRPC Check (ServeGRPC) calls it
// too, with the request Envoy describes, and sends what it writes.
func (c *Collector) handleCheck(w http.ResponseWriter, r *http.Request) {
	tenant, p := c.checkTenant(r)
	if p != nil {
		c.metrics.check[checkRejected].Inc()
		p.Write(w)
		return
	}
	v := c.cfg.Gate.Check(tenant)
	if v.Block != nil {
		outcome := checkBlocked
		if v.Stale {
			outcome = checkStaleDenied
		}
		c.metrics.check[outcome].Inc()
		c.metrics.paymentRequired.WithLabelValues(string(v.Block.Decision.Reason)).Inc()
		v.Block.Write(w, c.cfg.Now())
		return
	}
	outcome := checkAllowed
	if v.Stale {
		outcome = checkStaleAllowed
	}
	if !c.cfg.KnownTenant(tenant) {
		if c.cfg.UnknownTenantPolicy == gate.Deny {
			c.metrics.check[checkUnknownDenied].Inc()
			schemas.NewProblem(schemas.ProblemUnknownTenant,
				fmt.Sprintf("tenant %q has no plan; ask the API provider to set one up", tenant)).Write(w)
			return
		}
		outcome = checkUnknownAllowed
	}
	if !c.cfg.DontRecordChecks {
		if p := c.recordCheck(r, tenant); p != nil {
			c.metrics.check[checkRejected].Inc()
			p.Write(w)
			return
		}
	}
	c.metrics.check[outcome].Inc()
	w.WriteHeader(http.StatusOK)
}

// checkTenant finds the tenant of a checked call: a tenant API key decides
// it; otherwise (no key, an admin key, or auth off) the tenant header does.
func (c *Collector) checkTenant(r *http.Request) (string, *schemas.Problem) {
	principal, err := c.cfg.Keys.Authenticate(r)
	if err == nil && principal.Tenant != "" {
		return principal.Tenant, nil
	}
	if err != nil && r.Header.Get(c.cfg.TenantHeader) == "" {
		return "", schemas.NewProblem(schemas.ProblemUnauthorized,
			"send the caller's API key, or the tenant in the "+c.cfg.TenantHeader+" header")
	}
	tenant := r.Header.Get(c.cfg.TenantHeader)
	if !schemas.ValidTenant(tenant) {
		return "", schemas.NewProblem(schemas.ProblemInvalidTenant,
			c.cfg.TenantHeader+" must be "+schemas.TenantGrammar)
	}
	return tenant, nil
}

// recordCheck queues the allowed call as a usage event without waiting for
// it to be durable: the check never waits on NATS.
func (c *Collector) recordCheck(r *http.Request, tenant string) *schemas.Problem {
	e := schemas.Event{Tenant: tenant, Meter: DefaultMeter, Value: 1, Time: c.cfg.Now().UTC()}
	if m := r.Header.Get(DefaultMeterHeader); m != "" {
		if !schemas.ValidMeter(m) {
			return schemas.NewProblem(schemas.ProblemInvalidMeter, DefaultMeterHeader+" must match "+schemas.MeterGrammar)
		}
		e.Meter = m
	}
	if v := r.Header.Get(DefaultValueHeader); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 || n > schemas.MaxValue {
			return schemas.NewProblem(schemas.ProblemInvalidValue,
				DefaultValueHeader+" must be an integer from 0 to "+strconv.Itoa(schemas.MaxValue))
		}
		e.Value = n
	}
	e.ID = checkEventID(r.Header.Get("X-Request-ID"))
	if err := c.pipe.enqueue(e); errors.Is(err, ErrSpoolFull) {
		// The call is allowed (the check never waits on NATS) but cannot
		// be recorded: NATS is away and the spool is full.
		c.metrics.rejected.WithLabelValues(rejectSpoolFull).Inc()
		return nil
	} else if err != nil {
		return schemas.NewProblem(schemas.ProblemUnavailable, "the collector is shutting down")
	}
	c.metrics.accepted.Inc()
	return nil
}

// hashedIDPrefix marks an event id made from an X-Request-ID that cannot be
// an id as it is.
const hashedIDPrefix = "sha256:"

// checkEventID is the id of the event recording a checked call. The
// gateway's X-Request-ID is the id when it can be one (docs/architecture.md#usage-event: at most
// 128 characters of valid UTF-8), so a retried call counts once. A longer
// (or not UTF-8) one is hashed: the same header gives the same id, which
// keeps that property; a random id would count every retry. Only a call
// without X-Request-ID gets a random id.
func checkEventID(requestID string) string {
	switch {
	case requestID == "":
		return nuid.Next()
	case utf8.ValidString(requestID) && utf8.RuneCountInString(requestID) <= schemas.MaxIDLen:
		return requestID
	}
	sum := sha256.Sum256([]byte(requestID))
	return hashedIDPrefix + hex.EncodeToString(sum[:])
}
