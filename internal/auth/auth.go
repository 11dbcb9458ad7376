// Package auth maps the API keys of the config file to principals: a tenant
// key acts for one tenant, an admin key for all.
package auth

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/meterd/meterd/schemas"
)

// Key is one API key of the config file: exactly one of Tenant or Admin.
type Key struct {
	Key    string `yaml:"key"`
	Tenant string `yaml:"tenant,omitempty"`
	Admin  bool   `yaml:"admin,omitempty"`
}

// Principal is who a request acts for.
type Principal struct {
	Tenant string // set for a tenant key
	Admin  bool
}

// MayActFor reports whether p may read or write tenant's data.
func (p Principal) MayActFor(tenant string) bool {
	return p.Admin || p.Tenant == tenant
}

// Errors of Authenticate.
var (
	ErrMissingKey = errors.New("auth: missing API key")
	ErrBadKey     = errors.New("auth: unknown API key")
)

// MinKeyLen is the shortest API key accepted in a config file.
const MinKeyLen = 16

// Keys authenticates requests. The zero value rejects every request.
type Keys struct {
	byHash map[[sha256.Size]byte]Principal
	open   bool
}

// NewKeys checks keys and indexes them. Keys are held as SHA-256 digests so
// the lookup's timing says nothing about a key's bytes.
func NewKeys(keys []Key) (*Keys, error) {
	k := &Keys{byHash: make(map[[sha256.Size]byte]Principal, len(keys))}
	for i, key := range keys {
		switch {
		case len(key.Key) < MinKeyLen:
			return nil, fmt.Errorf("api_keys[%d]: key must be at least %d characters", i, MinKeyLen)
		case key.Admin == (key.Tenant != ""):
			return nil, fmt.Errorf("api_keys[%d]: set exactly one of tenant or admin", i)
		case key.Tenant != "" && !schemas.ValidTenant(key.Tenant):
			return nil, fmt.Errorf("api_keys[%d]: tenant %q must be %s", i, key.Tenant, schemas.TenantGrammar)
		}
		h := sha256.Sum256([]byte(key.Key))
		if _, dup := k.byHash[h]; dup {
			return nil, fmt.Errorf("api_keys[%d]: the same key is listed twice", i)
		}
		k.byHash[h] = Principal{Tenant: key.Tenant, Admin: key.Admin}
	}
	return k, nil
}

// Open returns Keys that let every request act as admin: `meterd dev` with no
// keys configured, or a component started with --insecure.
func Open() *Keys { return &Keys{open: true} }

// IsOpen reports whether authentication is off.
func (k *Keys) IsOpen() bool { return k != nil && k.open }

// Empty reports whether no key is configured.
func (k *Keys) Empty() bool { return k == nil || len(k.byHash) == 0 }

// Authenticate finds the principal of the key in the Authorization: Bearer
// header or the X-API-Key header.
func (k *Keys) Authenticate(r *http.Request) (Principal, error) {
	if k.IsOpen() {
		return Principal{Admin: true}, nil
	}
	key := r.Header.Get("X-API-Key")
	if key == "" {
		if h := r.Header.Get("Authorization"); len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
			key = strings.TrimSpace(h[7:])
		}
	}
	if key == "" {
		return Principal{}, ErrMissingKey
	}
	if k == nil {
		return Principal{}, ErrBadKey
	}
	p, ok := k.byHash[sha256.Sum256([]byte(key))]
	if !ok {
		return Principal{}, ErrBadKey
	}
	return p, nil
}

// Unauthorized answers a request that Authenticate refused with err: 401,
// the Bearer challenge and the problem.
func Unauthorized(w http.ResponseWriter, err error) {
	w.Header().Set("WWW-Authenticate", `Bearer realm="meterd"`)
	Problem(err).Write(w)
}

// Problem returns the 401 problem for an Authenticate error.
func Problem(err error) *schemas.Problem {
	p := schemas.NewProblem(schemas.ProblemUnauthorized,
		"send a valid API key as Authorization: Bearer <key> or X-API-Key")
	if errors.Is(err, ErrBadKey) {
		p.Detail = "the API key is not known"
	}
	return p
}
