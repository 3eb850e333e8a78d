{{/* Names */}}
{{- define "mixquant.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mixquant.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "mixquant.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "mixquant.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mixquant.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "mixquant.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* selector labels of one component: router, prefill or decode (call with (list $ "router")) */}}
{{- define "mixquant.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "mixquant.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* the workers of one role by their stable StatefulSet names, as the router's --prefill-urls/--decode-urls */}}
{{- define "mixquant.workerUrls" -}}
{{- $root := index . 0 -}}
{{- $role := index . 1 -}}
{{- $values := index $root.Values $role -}}
{{- $name := printf "%s-%s" (include "mixquant.fullname" $root) $role -}}
{{- $urls := list -}}
{{- range $i := until (int $values.replicas) -}}
{{- $urls = append $urls (printf "tcp://%s-%d.%s:%d" $name $i $name (int $values.port)) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}

{{/* the model folder every role is given (--model-path); empty for the embedded model on workers */}}
{{- define "mixquant.modelPath" -}}
{{- if eq .Values.model.source "embedded" -}}
/cache/models/SmolLM2-135M-Instruct
{{- else -}}
{{- required "model.name: the model's folder under /models" .Values.model.name | printf "/models/%s" -}}
{{- end -}}
{{- end -}}

{{- define "mixquant.checkModel" -}}
{{- if not (has .Values.model.source (list "embedded" "pvc" "hostPath")) -}}
{{- fail "model.source must be embedded, pvc or hostPath" -}}
{{- end -}}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.claimName) -}}
{{- fail "model.pvc.claimName is required with model.source=pvc" -}}
{{- end -}}
{{- if and (eq .Values.model.source "embedded") .Values.model.quantizedName -}}
{{- fail "model.quantizedName needs model.source pvc or hostPath (it is a folder under /models)" -}}
{{- end -}}
{{- if and (eq .Values.model.source "hostPath") (not .Values.model.hostPath.path) -}}
{{- fail "model.hostPath.path is required with model.source=hostPath" -}}
{{- end -}}
{{- end -}}

{{- define "mixquant.apiKeySecret" -}}
{{- if .Values.apiKey.create -}}
{{- printf "%s-api-key" (include "mixquant.fullname" .) -}}
{{- else -}}
{{- .Values.apiKey.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* volumes every pod has: /cache, the model folders, /dev/shm for NCCL */}}
{{- define "mixquant.volumes" -}}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.cache.sizeLimit }}
{{- if eq .Values.model.source "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
- name: models
  hostPath:
    path: {{ .Values.model.hostPath.path }}
    type: Directory
{{- end }}
{{- if .Values.shm.enabled }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shm.sizeLimit }}
{{- end }}
{{- end -}}

{{- define "mixquant.volumeMounts" -}}
- name: cache
  mountPath: /cache
{{- if ne .Values.model.source "embedded" }}
- name: models
  mountPath: /models
  readOnly: true
{{- end }}
{{- if .Values.shm.enabled }}
- name: shm
  mountPath: /dev/shm
{{- end }}
{{- end -}}

{{- define "mixquant.env" -}}
- name: MIXQUANT_CACHE
  value: /cache
- name: HF_HOME
  value: /cache/huggingface
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}
