{{/* Names and labels. */}}
{{- define "ctxgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ctxgate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ctxgate.redisName" -}}
{{- printf "%s-redis" (include "ctxgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object, without app.kubernetes.io/component. */}}
{{- define "ctxgate.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "ctxgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "ctxgate.labels" -}}
{{ include "ctxgate.commonLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "ctxgate.redisLabels" -}}
{{ include "ctxgate.commonLabels" . }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "ctxgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ctxgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "ctxgate.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "ctxgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "ctxgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ctxgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ctxgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret the pods read: the user's, or the chart's when it has anything to hold. */}}
{{- define "ctxgate.secretName" -}}
{{- default (include "ctxgate.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "ctxgate.createSecret" -}}
{{- if and (not .Values.secrets.existingSecret) (or .Values.secrets.env .Values.gatewayKeys.keys) -}}
true
{{- end }}
{{- end }}

{{- define "ctxgate.hasGatewayKeys" -}}
{{- if or .Values.gatewayKeys.keys .Values.gatewayKeys.fromExistingSecret -}}
true
{{- end }}
{{- end }}

{{/* "true" when clients must present a gateway key (from any source ctxgate reads). */}}
{{- define "ctxgate.authEnabled" -}}
{{- $auth := .Values.config.auth | default dict }}
{{- if or (include "ctxgate.hasGatewayKeys" .) $auth.keys $auth.redis -}}
true
{{- end }}
{{- end }}

{{/* "true" when sessions live in Redis (shared by replicas). */}}
{{- define "ctxgate.redisEnabled" -}}
{{- if or .Values.redis.url .Values.redis.existingSecretKey .Values.redis.bundled.enabled -}}
true
{{- end }}
{{- end }}

{{- define "ctxgate.embeddedDir" -}}
/var/lib/ctxgate
{{- end }}

{{/*
Environment variables named by the config: upstreams[].api_key_env, tools[].http.headers_env
values and tools[].mcp.bearer_env. One per line, sorted and unique.
*/}}
{{- define "ctxgate.secretEnvNames" -}}
{{- $names := list }}
{{- range (.Values.config.upstreams | default list) }}
{{- if .api_key_env }}{{ $names = append $names .api_key_env }}{{ end }}
{{- end }}
{{- range (.Values.config.tools | default list) }}
{{- if .http }}{{ range $_, $var := (.http.headers_env | default dict) }}{{ $names = append $names $var }}{{ end }}{{ end }}
{{- if .mcp }}{{ if .mcp.bearer_env }}{{ $names = append $names .mcp.bearer_env }}{{ end }}{{ end }}
{{- end }}
{{- $names | uniq | sortAlpha | join "\n" }}
{{- end }}

{{/*
Seconds in a humantime duration made of whole units ("30s", "1m30s", "2m", "1h", "500ms";
milliseconds round up). values.schema.json restricts shutdown_timeout to these forms.
*/}}
{{- define "ctxgate.durationSeconds" -}}
{{- $ms := 0 }}
{{- range (regexFindAll "[0-9]+ *(ms|h|m|s)" . -1) }}
{{- $n := regexFind "[0-9]+" . | int }}
{{- $unit := regexFind "(ms|h|m|s)$" . }}
{{- if eq $unit "h" }}{{ $ms = add $ms (mul $n 3600000) }}
{{- else if eq $unit "m" }}{{ $ms = add $ms (mul $n 60000) }}
{{- else if eq $unit "s" }}{{ $ms = add $ms (mul $n 1000) }}
{{- else }}{{ $ms = add $ms $n }}
{{- end }}
{{- end }}
{{- div (add $ms 999) 1000 }}
{{- end }}

{{- define "ctxgate.shutdownTimeout" -}}
{{- $server := .Values.config.server | default dict }}
{{- $server.shutdown_timeout | default "30s" }}
{{- end }}

{{- define "ctxgate.terminationGracePeriodSeconds" -}}
{{- $shutdown := include "ctxgate.durationSeconds" (include "ctxgate.shutdownTimeout" .) | int }}
{{- add .Values.lifecycle.preStopSleepSeconds $shutdown .Values.lifecycle.terminationMarginSeconds }}
{{- end }}

{{/*
Helm reads numbers in values files as float64, and toToml writes those as "1024.0", which
ctxgate's integer keys reject. This rewrites, in place, every whole float under a map as an
integer (a fraction such as high_water = 0.8 stays a float); lists are rebuilt.
*/}}
{{- define "ctxgate.wholeNumbers" -}}
{{- $map := . }}
{{- range $key, $value := $map }}
{{- if and (kindIs "float64" $value) (eq $value (floor $value)) }}
{{- $_ := set $map $key (int64 $value) }}
{{- else if kindIs "map" $value }}
{{- include "ctxgate.wholeNumbers" $value }}
{{- else if kindIs "slice" $value }}
{{- $items := list }}
{{- range $value }}
{{- $box := dict "v" . }}
{{- include "ctxgate.wholeNumbers" $box }}
{{- $items = append $items $box.v }}
{{- end }}
{{- $_ := set $map $key $items }}
{{- end }}
{{- end }}
{{- end }}

{{/* The ctxgate.toml the ConfigMap holds. */}}
{{- define "ctxgate.configToml" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- $server := get $config "server" | default dict }}
{{- $_ := set $server "listen" "0.0.0.0:8080" }}
{{- $_ := set $config "server" $server }}
{{- $sessions := get $config "sessions" | default dict }}
{{- if .Values.redis.existingSecretKey }}
{{- $_ := unset $sessions "store" }}
{{- else if .Values.redis.url }}
{{- $_ := set $sessions "store" .Values.redis.url }}
{{- else if .Values.redis.bundled.enabled }}
{{- $_ := set $sessions "store" (printf "redis://%s:6379/" (include "ctxgate.redisName" .)) }}
{{- else }}
{{- $_ := set $sessions "store" (printf "embedded:%s/ctxgate.redb" (include "ctxgate.embeddedDir" .)) }}
{{- end }}
{{- $_ := set $config "sessions" $sessions }}
{{- if include "ctxgate.hasGatewayKeys" . }}
{{- $auth := get $config "auth" | default dict }}
{{- $_ := set $auth "keys_file" "/etc/ctxgate/keys/keys.toml" }}
{{- $_ := set $config "auth" $auth }}
{{- end }}
{{- include "ctxgate.wholeNumbers" $config }}
{{- toToml $config }}
{{- end }}

{{/* keys.toml: the gateway keys as [[keys]] entries. */}}
{{- define "ctxgate.keysToml" -}}
{{- $doc := dict "keys" (deepCopy .Values.gatewayKeys.keys) }}
{{- include "ctxgate.wholeNumbers" $doc }}
{{- toToml $doc }}
{{- end }}

{{/* Checks the schema cannot express; every template includes this. */}}
{{- define "ctxgate.validate" -}}
{{- if not (include "ctxgate.redisEnabled" .) }}
{{- if gt (int .Values.replicaCount) 1 }}
{{- fail "replicaCount > 1 needs Redis (redis.url, redis.existingSecretKey or redis.bundled.enabled): the embedded session store is one file in one pod, and replicas must share sessions" }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- fail "autoscaling.enabled needs Redis (redis.url, redis.existingSecretKey or redis.bundled.enabled): the embedded session store is one file in one pod, and replicas must share sessions" }}
{{- end }}
{{- end }}
{{- if gt (len (compact (list .Values.redis.url .Values.redis.existingSecretKey (ternary "bundled" "" .Values.redis.bundled.enabled)))) 1 }}
{{- fail "choose one session store: redis.url, redis.existingSecretKey or redis.bundled.enabled" }}
{{- end }}
{{- if contains "@" .Values.redis.url }}
{{- fail "redis.url carries credentials and would land in the ConfigMap: put the URL in a Secret and use secrets.existingSecret with redis.existingSecretKey" }}
{{- end }}
{{- if and .Values.redis.existingSecretKey (not .Values.secrets.existingSecret) }}
{{- fail "redis.existingSecretKey needs secrets.existingSecret (the Secret holding the URL)" }}
{{- end }}
{{- if and .Values.gatewayKeys.fromExistingSecret (not .Values.secrets.existingSecret) }}
{{- fail "gatewayKeys.fromExistingSecret needs secrets.existingSecret (the Secret holding keys.toml)" }}
{{- end }}
{{- if and .Values.gatewayKeys.fromExistingSecret .Values.gatewayKeys.keys }}
{{- fail "set gatewayKeys.keys or gatewayKeys.fromExistingSecret, not both" }}
{{- end }}
{{- if .Values.secrets.existingSecret }}
{{- if .Values.secrets.env }}
{{- fail "secrets.env is for the chart's own Secret; with secrets.existingSecret put the variables in that Secret" }}
{{- end }}
{{- if .Values.gatewayKeys.keys }}
{{- fail "gatewayKeys.keys is for the chart's own Secret; with secrets.existingSecret put keys.toml in that Secret and set gatewayKeys.fromExistingSecret" }}
{{- end }}
{{- else }}
{{- range $name := splitList "\n" (include "ctxgate.secretEnvNames" .) }}
{{- if and $name (not (hasKey $.Values.secrets.env $name)) }}
{{- fail (printf "config names the environment variable %s (api_key_env, headers_env or bearer_env) but secrets.env has no %s and secrets.existingSecret is not set" $name $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- $sessions := (.Values.config.sessions | default dict) }}
{{- if hasKey $sessions "store" }}
{{- fail "config.sessions.store is set by the chart: use redis.url, redis.existingSecretKey or redis.bundled.enabled" }}
{{- end }}
{{- if hasKey (.Values.config.auth | default dict) "keys_file" }}
{{- fail "config.auth.keys_file is set by the chart: use gatewayKeys.keys or gatewayKeys.fromExistingSecret" }}
{{- end }}
{{- $server := (.Values.config.server | default dict) }}
{{- if hasKey $server "listen" }}
{{- fail "config.server.listen is set by the chart (0.0.0.0:8080)" }}
{{- end }}
{{- end }}

{{/*
The pod's volumes, mounts and environment, shared by the Deployment and the test Pod so
`helm test` checks exactly what the gateway runs with.
*/}}
{{- define "ctxgate.env" -}}
{{- range $name := splitList "\n" (include "ctxgate.secretEnvNames" .) }}
{{- if $name }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "ctxgate.secretName" $ }}
      key: {{ $name }}
{{- end }}
{{- end }}
{{- if .Values.redis.existingSecretKey }}
- name: CTXGATE__SESSIONS__STORE
  valueFrom:
    secretKeyRef:
      name: {{ include "ctxgate.secretName" . }}
      key: {{ .Values.redis.existingSecretKey }}
{{- end }}
{{- end }}

{{- define "ctxgate.volumeMounts" -}}
- name: config
  mountPath: /etc/ctxgate/ctxgate.toml
  subPath: ctxgate.toml
  readOnly: true
{{- if include "ctxgate.hasGatewayKeys" . }}
- name: gateway-keys
  mountPath: /etc/ctxgate/keys
  readOnly: true
{{- end }}
- name: tmp
  mountPath: /tmp
{{- if not (include "ctxgate.redisEnabled" .) }}
- name: state
  mountPath: {{ include "ctxgate.embeddedDir" . }}
{{- end }}
{{- end }}

{{- define "ctxgate.volumes" -}}
- name: config
  configMap:
    name: {{ include "ctxgate.fullname" . }}
{{- if include "ctxgate.hasGatewayKeys" . }}
- name: gateway-keys
  secret:
    secretName: {{ include "ctxgate.secretName" . }}
    defaultMode: 0440
    items:
      - key: keys.toml
        path: keys.toml
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if not (include "ctxgate.redisEnabled" .) }}
- name: state
  emptyDir: {}
{{- end }}
{{- end }}

{{- define "ctxgate.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "ctxgate.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
{{- end }}
