{{/*
Chart name, truncated to the 63 characters a label value may have.
*/}}
{{- define "sluice.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's resources: <release>-<chart>, or just <release> when the
release name already contains the chart name.
*/}}
{{- define "sluice.fullname" -}}
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

{{/*
chart label value: <chart>-<version>.
*/}}
{{- define "sluice.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: stable for the life of a release (a Deployment's selector is immutable).
*/}}
{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{/*
Labels of every resource.
*/}}
{{- define "sluice.labels" -}}
helm.sh/chart: {{ include "sluice.chart" . }}
{{ include "sluice.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sluice
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Name of the ServiceAccount the pods use.
*/}}
{{- define "sluice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sluice.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference from {repository, tag, digest}: the digest wins over the tag.
Call with (dict "image" .Values.image "default" "<tag when empty>").
*/}}
{{- define "sluice.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (.image.tag | default .default | toString) }}
{{- end }}
{{- end }}

{{/*
Seconds the kubelet waits before SIGKILL: preStop sleep + the server's own drain + a
margin, so a drain is never cut short.
*/}}
{{- define "sluice.terminationGracePeriodSeconds" -}}
{{- add .Values.termination.preStopSleepSeconds .Values.server.shutdownGracePeriodSeconds .Values.termination.marginSeconds }}
{{- end }}

{{/*
"true" when a value is set: neither null/absent nor the empty string (0 counts as set).
*/}}
{{- define "sluice.isSet" -}}
{{- if and (not (kindIs "invalid" .)) (ne (toString .) "") }}true{{ end }}
{{- end }}

{{/*
Cross-field checks that the values schema cannot express. Included by the Deployment,
so every render runs them.
*/}}
{{- define "sluice.validate" -}}
{{- $as := .Values.autoscaling }}
{{- if and $as.hpa.enabled $as.keda.enabled }}
{{- fail "autoscaling.hpa.enabled and autoscaling.keda.enabled are both true: enable one of them. KEDA creates its own HorizontalPodAutoscaler, and two autoscalers on one Deployment fight over its replica count." }}
{{- end }}
{{- if $as.hpa.enabled }}
{{- if not (or $as.hpa.cpu.enabled $as.hpa.queueTime.enabled) }}
{{- fail "autoscaling.hpa.enabled is true but no metric is enabled: set autoscaling.hpa.cpu.enabled and/or autoscaling.hpa.queueTime.enabled." }}
{{- end }}
{{- if gt (int $as.hpa.minReplicas) (int $as.hpa.maxReplicas) }}
{{- fail "autoscaling.hpa.minReplicas must not exceed autoscaling.hpa.maxReplicas." }}
{{- end }}
{{- end }}
{{- if $as.keda.enabled }}
{{- if gt (int $as.keda.minReplicaCount) (int $as.keda.maxReplicaCount) }}
{{- fail "autoscaling.keda.minReplicaCount must not exceed autoscaling.keda.maxReplicaCount." }}
{{- end }}
{{- if not (or $as.keda.prometheus.enabled $as.keda.extraTriggers) }}
{{- fail "autoscaling.keda.enabled is true but it has no trigger: enable autoscaling.keda.prometheus or add autoscaling.keda.extraTriggers." }}
{{- end }}
{{- end }}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if $pdb.enabled }}
{{- $min := include "sluice.isSet" $pdb.minAvailable }}
{{- $max := include "sluice.isSet" $pdb.maxUnavailable }}
{{- if and $min $max }}
{{- fail "podDisruptionBudget: set only one of minAvailable and maxUnavailable (set the other to \"\")." }}
{{- end }}
{{- if not (or $min $max) }}
{{- fail "podDisruptionBudget: set one of minAvailable and maxUnavailable." }}
{{- end }}
{{- end }}
{{- $mr := .Values.modelRepository }}
{{- if and (eq $mr.source "pvc") (not $mr.pvc.claimName) }}
{{- fail "modelRepository.source is pvc: set modelRepository.pvc.claimName to an existing PersistentVolumeClaim." }}
{{- end }}
{{- if eq $mr.source "initContainer" }}
{{- if not $mr.initContainer.image.repository }}
{{- fail "modelRepository.source is initContainer: set modelRepository.initContainer.image.repository." }}
{{- end }}
{{- if not (or $mr.initContainer.image.tag $mr.initContainer.image.digest) }}
{{- fail "modelRepository.source is initContainer: set modelRepository.initContainer.image.tag or .digest." }}
{{- end }}
{{- if not $mr.initContainer.command }}
{{- fail "modelRepository.source is initContainer: set modelRepository.initContainer.command (what writes the models into the repository volume)." }}
{{- end }}
{{- end }}
{{- $srv := .Values.server }}
{{- if and (ne $srv.modelControlMode "explicit") $srv.loadModels }}
{{- fail (printf "server.loadModels is %s but server.modelControlMode is %s: in mode %s every model loads at start-up and the server refuses load_model. Set server.modelControlMode to explicit, or server.loadModels to []." (toJson $srv.loadModels) $srv.modelControlMode $srv.modelControlMode) }}
{{- end }}
{{- $tok := $srv.modelControlToken }}
{{- if and $tok.existingSecret $tok.value }}
{{- fail "server.modelControlToken: set only one of existingSecret (recommended) and value (the chart then creates a Secret from it)." }}
{{- end }}
{{- if and (eq $srv.modelControlMode "explicit") (not $tok.existingSecret) (not $tok.value) (not $srv.allowUnauthenticatedModelControl) }}
{{- fail "server.modelControlMode is explicit but no server.modelControlToken is set: anyone who can reach the gRPC port could load and unload models. Set server.modelControlToken.existingSecret (recommended) or .value, or accept that with server.allowUnauthenticatedModelControl: true (the server refuses to start the same way)." }}
{{- end }}
{{- $ports := .Values.containerPorts }}
{{- if or (eq (int $ports.http) (int $ports.grpc)) (eq (int $ports.http) (int $ports.metrics)) (eq (int $ports.grpc) (int $ports.metrics)) }}
{{- fail "containerPorts: http, grpc and metrics must be three different ports." }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding the model-control token, or "" when no token is configured:
server.modelControlToken.existingSecret, else the Secret the chart creates from
server.modelControlToken.value.
*/}}
{{- define "sluice.modelControlTokenSecret" -}}
{{- $tok := .Values.server.modelControlToken }}
{{- if $tok.existingSecret }}
{{- $tok.existingSecret }}
{{- else if $tok.value }}
{{- printf "%s-model-control" (include "sluice.fullname" . | trunc 49 | trimSuffix "-") }}
{{- end }}
{{- end }}
