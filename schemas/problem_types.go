package schemas

import (
	"fmt"
	"net/http"
)

// ProblemType is one kind of problem meterd answers over HTTP. Its slug,
// status and title come from one table (problemTypes), so a handler cannot
// misspell a type or answer one type with two statuses: every problem is
// built by NewProblem from one of these constants.
type ProblemType uint8

// The problem types meterd answers, by status. Each constant's slug (the
// last part of its type URI) is in the table below.
const (
	_ ProblemType = iota // the zero value is no type

	ProblemMalformedBody
	ProblemNoEvents
	ProblemInvalidParameter
	ProblemInvalidTenant
	ProblemInvalidMeter
	ProblemInvalidValue
	ProblemInvalidSignature
	ProblemUnauthorized
	ProblemQuotaExceeded
	ProblemPaymentOverdue
	ProblemPaymentMethodRequired
	ProblemSuspended
	ProblemForbidden
	ProblemForbiddenTenant
	ProblemUnknownTenant
	ProblemNotFound
	ProblemTenantNotFound
	ProblemMethodNotAllowed
	ProblemBodyTimeout
	ProblemBodyTooLarge
	ProblemEventTooLarge
	ProblemUnsupportedMediaType
	ProblemUnsupportedContentEncoding
	ProblemInvalidEvents
	ProblemInvalidTenantSettings
	ProblemSpoolFull
	ProblemInternal
	ProblemOverloaded
	ProblemUnavailable
	ProblemStoreUnavailable
	ProblemNotReady
	ProblemBlocklistStale

	problemTypeEnd // one past the last type
)

// problemInfo is one row of the table.
type problemInfo struct {
	slug   string
	status int
	// title is the status text: meterd's bodies have always carried it,
	// and clients may compare it.
	title string
	// when says, for the README, when meterd answers this type.
	when string
}

// problemTypes is the table of every problem type meterd answers. README.md
// lists it between the problem-types markers (TestReadmeProblemTypes keeps
// that list in step). Slugs are part of the API: clients match on them.
var problemTypes = [problemTypeEnd]problemInfo{
	ProblemMalformedBody: {"malformed-body", http.StatusBadRequest, "Bad Request",
		"a body is not well-formed (JSON, NDJSON, gzip, a tenant change, a billing webhook event) or could not be read"},
	ProblemNoEvents: {"no-events", http.StatusBadRequest, "Bad Request",
		"a `POST /v1/events` body holds no events"},
	ProblemInvalidParameter: {"invalid-parameter", http.StatusBadRequest, "Bad Request",
		"a query parameter is wrong; `invalid_params: [{name, reason}]` names each"},
	ProblemInvalidTenant: {"invalid-tenant", http.StatusBadRequest, "Bad Request",
		"a tenant name (`/v1/check`'s `X-Tenant-ID`, the admin API's path) is not a valid tenant name"},
	ProblemInvalidMeter: {"invalid-meter", http.StatusBadRequest, "Bad Request",
		"`/v1/check`'s `X-Meter` is not a valid meter name"},
	ProblemInvalidValue: {"invalid-value", http.StatusBadRequest, "Bad Request",
		"`/v1/check`'s `X-Meter-Value` is not an integer from 0 to 2^32 − 1"},
	ProblemInvalidSignature: {"invalid-signature", http.StatusBadRequest, "Bad Request",
		"a billing webhook's `Stripe-Signature` does not verify or is too old"},
	ProblemUnauthorized: {"unauthorized", http.StatusUnauthorized, "Unauthorized",
		"no API key, or an unknown one (`Authorization: Bearer <key>` or `X-API-Key`)"},
	ProblemQuotaExceeded: {"quota-exceeded", http.StatusPaymentRequired, "Payment Required",
		"the tenant used its plan's limit of a meter this period (`Retry-After`: to the period's end)"},
	ProblemPaymentOverdue: {"payment-overdue", http.StatusPaymentRequired, "Payment Required",
		"the tenant's payment is overdue"},
	ProblemPaymentMethodRequired: {"payment-method-required", http.StatusPaymentRequired, "Payment Required",
		"the tenant has no valid payment method"},
	ProblemSuspended: {"suspended", http.StatusPaymentRequired, "Payment Required",
		"the tenant's account is suspended"},
	ProblemForbidden: {"forbidden", http.StatusForbidden, "Forbidden",
		"the API key may not do this: a tenant key reading another tenant's usage, or on an admin endpoint"},
	ProblemForbiddenTenant: {"forbidden-tenant", http.StatusForbidden, "Forbidden",
		"a tenant's key sends another tenant's events"},
	ProblemUnknownTenant: {"unknown-tenant", http.StatusForbidden, "Forbidden",
		"`/v1/check` for a tenant without a plan under `--unknown-tenant-policy deny`"},
	ProblemNotFound: {"not-found", http.StatusNotFound, "Not Found",
		"no such endpoint, or the billing webhook with no webhook secret configured"},
	ProblemTenantNotFound: {"tenant-not-found", http.StatusNotFound, "Not Found",
		"the admin API or `/v1/usage/summary` names a tenant the catalog (or the admin API's changes) does not hold"},
	ProblemMethodNotAllowed: {"method-not-allowed", http.StatusMethodNotAllowed, "Method Not Allowed",
		"the endpoint exists but not for this method; see the `Allow` header"},
	ProblemBodyTimeout: {"body-timeout", http.StatusRequestTimeout, "Request Timeout",
		"the body did not arrive within `--read-timeout`"},
	ProblemBodyTooLarge: {"body-too-large", http.StatusRequestEntityTooLarge, "Request Entity Too Large",
		"a body is over its bound (`--max-body-bytes` for events, also after gzip decompression; 64 KiB for a tenant change; 1 MiB for a webhook)"},
	ProblemEventTooLarge: {"event-too-large", http.StatusRequestEntityTooLarge, "Request Entity Too Large",
		"one event's encoding cannot fit in a batch by itself"},
	ProblemUnsupportedMediaType: {"unsupported-media-type", http.StatusUnsupportedMediaType, "Unsupported Media Type",
		"an unsupported `Content-Type`"},
	ProblemUnsupportedContentEncoding: {"unsupported-content-encoding", http.StatusUnsupportedMediaType, "Unsupported Media Type",
		"an unsupported `Content-Encoding` (identity and gzip are)"},
	ProblemInvalidEvents: {"invalid-events", http.StatusUnprocessableEntity, "Unprocessable Entity",
		"some events break the rules; `errors: [{index, field, message}]` lists each (the first 1000) and none is accepted"},
	ProblemInvalidTenantSettings: {"invalid-tenant-settings", http.StatusUnprocessableEntity, "Unprocessable Entity",
		"a tenant change (`PUT /v1/tenants/{tenant}`) names an unknown plan or breaks a rule; `errors` lists each"},
	ProblemSpoolFull: {"spool-full", http.StatusTooManyRequests, "Too Many Requests",
		"NATS is unreachable and the spool has no room for the whole request; retry the same events later"},
	ProblemInternal: {"internal", http.StatusInternalServerError, "Internal Server Error",
		"meterd failed to encode what it must send or store (a bug)"},
	ProblemOverloaded: {"overloaded", http.StatusServiceUnavailable, "Service Unavailable",
		"the bodies in flight hold `--max-inflight-body-bytes`; retry after `Retry-After`"},
	ProblemUnavailable: {"unavailable", http.StatusServiceUnavailable, "Service Unavailable",
		"events could not be made durable, the component is starting or shutting down, or a tenant change could not be stored; retry"},
	ProblemStoreUnavailable: {"store-unavailable", http.StatusServiceUnavailable, "Service Unavailable",
		"the usage store could not answer a usage report; retry"},
	ProblemNotReady: {"not-ready", http.StatusServiceUnavailable, "Service Unavailable",
		"`/readyz` when a dependency is down; the detail names each"},
	ProblemBlocklistStale: {"blocklist-stale", http.StatusServiceUnavailable, "Service Unavailable",
		"`/v1/check` under `--stale-policy deny` for a tenant without a decision while the gate has not heard from the enforcer"},
}

// ProblemTypes returns every problem type, in the table's order.
func ProblemTypes() []ProblemType {
	ts := make([]ProblemType, 0, problemTypeEnd-1)
	for t := ProblemType(1); t < problemTypeEnd; t++ {
		ts = append(ts, t)
	}
	return ts
}

func (t ProblemType) info() problemInfo {
	if t == 0 || t >= problemTypeEnd {
		panic(fmt.Sprintf("schemas: problem type %d is not in the table", t))
	}
	return problemTypes[t]
}

// Slug returns the type's name, the last part of its URI.
func (t ProblemType) Slug() string { return t.info().slug }

// URI returns the type's URI: ProblemBase + slug.
func (t ProblemType) URI() string { return ProblemBase + t.info().slug }

// Status returns the HTTP status every answer of this type has.
func (t ProblemType) Status() int { return t.info().status }

// Title returns the type's title, the text of its status.
func (t ProblemType) Title() string { return t.info().title }

// When says when meterd answers this type, as the README lists it.
func (t ProblemType) When() string { return t.info().when }

// String returns the slug.
func (t ProblemType) String() string { return t.Slug() }

// reasonProblem is the 402 problem type of each block reason.
var reasonProblem = map[Reason]ProblemType{
	ReasonQuotaExceeded:         ProblemQuotaExceeded,
	ReasonPaymentOverdue:        ProblemPaymentOverdue,
	ReasonPaymentMethodRequired: ProblemPaymentMethodRequired,
	ReasonSuspended:             ProblemSuspended,
}

// ReasonProblem returns the 402 problem type a block for reason answers
// with; ok is false for a reason meterd does not know.
func ReasonProblem(reason Reason) (t ProblemType, ok bool) {
	t, ok = reasonProblem[reason]
	return t, ok
}
