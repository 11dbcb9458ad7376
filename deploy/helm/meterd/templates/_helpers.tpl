{{/*
Labels of a workload, Service or PodDisruptionBudget: its selector labels
and the labels of every object. Selectors and pod templates carry only the
selector labels, as in the kustomize base, so two renders select the same
pods.
Argument: dict "root" $ "component" NAME.
*/}}
{{- define "meterd.labels" -}}
{{ include "meterd.selectorLabels" .component }}
{{ include "meterd.commonLabels" .root }}
{{- end }}

{{/*
Labels of every object: app.kubernetes.io/part-of, which the base gives
each object's metadata, and Helm's usual ones (the test comparing the chart
with the base leaves these out).
*/}}
{{- define "meterd.commonLabels" -}}
app.kubernetes.io/part-of: meterd
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/*
The labels a Service, PodDisruptionBudget or workload selects pods by.
Argument: the component's name.
*/}}
{{- define "meterd.selectorLabels" -}}
app.kubernetes.io/name: meterd
app.kubernetes.io/component: {{ . }}
{{- end }}

{{/* The meterd image, one for every component. */}}
{{- define "meterd.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/*
The name kustomize's generators give an object: its name, a dash and ten
characters of a SHA-256 of its kind, data (and type, for a Secret) and an
empty name (sigs.k8s.io/kustomize/api/hasher: json.Marshal of those fields;
it looks the name up by a path it never finds), the first ten hex digits
with 0, 1, 3, a and e replaced by g, h, k, m and t. A change of content
changes the name, which rolls the pods that mount it; with the default
values the ConfigMaps' names equal the base's. (A Secret's name differs
from the one kustomize would give the same content: kustomize hashes its
base64 wrapped in lines of 70, the chart unwrapped.)
Argument: dict "kind" KIND "name" NAME "data" DATA (and "type" for a Secret).
*/}}
{{- define "meterd.hashedName" -}}
{{- $hash := set (deepCopy .) "name" "" | toJson | sha256sum | trunc 10 | replace "0" "g" | replace "1" "h" | replace "3" "k" | replace "a" "m" | replace "e" "t" -}}
{{ .name }}-{{ $hash }}
{{- end }}

{{/* The meterd-config ConfigMap's data. */}}
{{- define "meterd.configData" -}}
{{- dict "meterd.yaml" (.Values.config | default (.Files.Get "files/meterd.yaml")) | toJson -}}
{{- end }}

{{- define "meterd.configName" -}}
{{ include "meterd.hashedName" (dict "kind" "ConfigMap" "name" "meterd-config" "data" (include "meterd.configData" . | fromJson)) }}
{{- end }}

{{/* The gateway-caddy ConfigMap's data. */}}
{{- define "meterd.caddyData" -}}
{{- dict "Caddyfile" (.Values.gateway.caddy.caddyfile | default (.Files.Get "files/Caddyfile")) | toJson -}}
{{- end }}

{{- define "meterd.caddyName" -}}
{{ include "meterd.hashedName" (dict "kind" "ConfigMap" "name" "gateway-caddy" "data" (include "meterd.caddyData" . | fromJson)) }}
{{- end }}

{{/*
The data of the Secret the chart creates (secret.create), base64 as a
Secret holds it.
*/}}
{{- define "meterd.secretData" -}}
{{- $s := .Values.secret -}}
{{- $d := dict
  "nats-url" (required "secret.natsUrl is required with secret.create" $s.natsUrl | b64enc)
  "clickhouse-dsn" (required "secret.clickhouseDsn is required with secret.create" $s.clickhouseDsn | b64enc)
  "api-keys.yaml" (required "secret.apiKeys is required with secret.create" $s.apiKeys | b64enc)
  "webhook-secret" (required "secret.webhookSecret is required with secret.create" $s.webhookSecret | b64enc) -}}
{{- with $s.notifySecret }}{{ $_ := set $d "notify-secret" (b64enc .) }}{{ end -}}
{{- toJson $d -}}
{{- end }}

{{/* The name of the Secret the components read. */}}
{{- define "meterd.secretName" -}}
{{- if .Values.secret.create -}}
{{ include "meterd.hashedName" (dict "kind" "Secret" "type" "Opaque" "name" .Values.secret.name "data" (include "meterd.secretData" . | fromJson)) }}
{{- else -}}
{{ .Values.secret.name }}
{{- end }}
{{- end }}

{{/*
The variables every meterd container starts with: the config file, the API
keys file and NATS.
*/}}
{{- define "meterd.commonEnv" -}}
- {name: METERD_CONFIG, value: /etc/meterd/config/meterd.yaml}
- {name: METERD_API_KEYS_FILE, value: /etc/meterd/secrets/api-keys.yaml}
- name: METERD_NATS_URL
  valueFrom: {secretKeyRef: {name: {{ include "meterd.secretName" . }}, key: nats-url}}
{{- end }}

{{/*
The variables every meterd container ends with: the shutdown grace (which
the pod's terminationGracePeriodSeconds covers), GOMEMLIMIT from the memory
limit, and the component's extraEnv.
Argument: the component's extraEnv.
*/}}
{{- define "meterd.tailEnv" -}}
- {name: METERD_SHUTDOWN_GRACE, value: 20s}
- name: GOMEMLIMIT
  valueFrom: {resourceFieldRef: {resource: limits.memory}}
{{- with . }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* A meterd container's security context. */}}
{{- define "meterd.containerSecurityContext" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {drop: [ALL]}
{{- end }}

{{/* The config and secrets volumes of a meterd pod. */}}
{{- define "meterd.volumes" -}}
- name: config
  configMap: {name: {{ include "meterd.configName" . }}}
- name: secrets
  secret:
    secretName: {{ include "meterd.secretName" . }}
    items: [{key: api-keys.yaml, path: api-keys.yaml}]
{{- end }}

{{/* The mounts of the config and secrets volumes. */}}
{{- define "meterd.volumeMounts" -}}
- {name: config, mountPath: /etc/meterd/config, readOnly: true}
- {name: secrets, mountPath: /etc/meterd/secrets, readOnly: true}
{{- end }}
